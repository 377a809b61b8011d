"""The models GoPT is compared with (paper Table 4, Fig. 6 and 7), behind one call and one registry.

Every variant is a :class:`~gopt_adapter.segmenter.SegmenterBase` (GoPT's
:class:`~gopt_adapter.GoptSegmenter`, :class:`BaselineSegmenter` or :class:`TwoStreamSegmenter`), so all of them take
the same batch and fail the same way::

    model(rgb [B, 3, H, W], aux [B, C_aux, H, W]) -> logits [B, K, H, W]

Input checks, the prompt injection before each block, the frozen-backbone bookkeeping, the
head and the bilinear upsampling are GoPT's own code. A baseline differs only in its adapter
(what it does to the tokens entering a block, see ``prompt``) and in which backbone weights
train:

========================  ==========================================  =======================
variant                   what acts on the tokens                     backbone
========================  ==========================================  =======================
``foundation``            nothing (RGB only; aux checked, ignored)    trains, follows train()
``probe``                 nothing (RGB only; aux checked, ignored)    frozen, eval mode
``fft``                   two streams (RGB, aux) through the shared   trains, follows train()
                          blocks, per-stream LayerNorms with CEN's
                          channel exchange, fused before the head
``fft_early``             ``x + E(aux)`` before block 0               trains, follows train()
``vpt_shallow``           ``x * (1 + E(aux))`` before block 0         frozen, eval mode
``vpt_deep``              ``x * (1 + E_l(aux))`` before every block   frozen, eval mode
``lora``                  ``x + Up(AuxPatchEmbed(aux))`` before 0,    frozen + trainable LoRA
                          LoRA on ``attn.qkv`` / ``attn.proj``        (peft), eval mode
``gopt*``                 grouping prompters (:func:`apply_gopt`)     frozen, eval mode
========================  ==========================================  =======================

``E`` and ``E_l`` are full-width ``Conv2d(C_aux, D, patch, patch)`` aux patch embeddings. All aux
contributions start at zero, so every variant but ``fft`` computes its RGB model at
initialisation (FFT-early starts as Foundation; probe, VPT, LoRA and GoPT start as the frozen
backbone; the probe stays that: only its head trains, the floor any use of aux must beat).
``fft`` (:mod:`gopt_adapter.baselines.two_stream`) starts as the mean of two foundation models, one on
the RGB image and one on the aux image seen as a grey picture, with CEN's exchange on the
channels whose LayerNorm gain is already below the threshold.

Modules, after peft's split of a method: ``base`` (config, the RGB-only adapter, the
backbone-training regimes, Foundation and probe), ``vpt``, ``lora``, ``fft`` (with its pieces
in ``two_stream``), and ``variants`` (the registry).
"""

from .base import (
    BACKBONE_TRAINING,
    CLASSIFIER_MODULES,
    AdditiveAuxAdapter,
    BaselineAdapter,
    BaselineConfig,
    BaselineSegmenter,
    FullWidthAuxEmbed,
    build_foundation,
    build_probe,
)
from .fft import TwoStreamAdapter, TwoStreamSegmenter, build_fft, build_fft_early
from .lora import NarrowAuxEmbed, build_lora, lora_target_pattern
from .variants import AUX_DROPOUT, VARIANTS, Variant, build_variant
from .vpt import VptAdapter, build_vpt

__all__ = [
    "AUX_DROPOUT",
    "BACKBONE_TRAINING",
    "CLASSIFIER_MODULES",
    "AdditiveAuxAdapter",
    "BaselineAdapter",
    "BaselineConfig",
    "BaselineSegmenter",
    "FullWidthAuxEmbed",
    "NarrowAuxEmbed",
    "TwoStreamAdapter",
    "TwoStreamSegmenter",
    "VARIANTS",
    "Variant",
    "VptAdapter",
    "build_fft",
    "build_fft_early",
    "build_foundation",
    "build_lora",
    "build_probe",
    "build_variant",
    "build_vpt",
    "lora_target_pattern",
]
