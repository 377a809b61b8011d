"""The models GoPT is compared with (paper Table 4, Fig. 6 and 7), behind one call and one registry.

Every variant is a :class:`~gopt_adapter.segmenter.PromptedSegmenter` (GoPT's
:class:`~gopt_adapter.model.GoptSegmenter` or :class:`BaselineSegmenter`), so all of them take
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
``fft`` (:mod:`gopt_adapter.two_stream`) starts as the mean of two foundation models, one on
the RGB image and one on the aux image seen as a grey picture, with CEN's exchange on the
channels whose LayerNorm gain is already below the threshold.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

import torch
from torch import nn

from .backbone import BackboneSpec
from .adapter import xavier_init_
from .config import HEADS, check_positive_int
from .contract import SegmentationAdapter
from .heads import build_head
from .tokens import add_to_patch_tokens, rescale_patch_tokens
from .model import GoptSegmenter, apply_gopt
from .prompter import AuxPatchEmbed
from .segmenter import DEFAULT_ADAPTER, PromptedSegmenter, check_unwrapped
from .two_stream import (
    EXCHANGE_L1,
    EXCHANGE_RATIO,
    EXCHANGE_THRESHOLD,
    ModalityLayerNorm,
    StreamFusion,
    aux_patch_embedding,
    check_exchange_settings,
    check_two_stream_model,
    merge_norms,
    split_norms,
    two_stream_features,
)

BACKBONE_TRAINING = ("frozen", "full", "lora")
# timm's image-classification tail (forward_head): the dense head replaces it, no gradient
# reaches it, so full fine-tuning leaves it frozen.
CLASSIFIER_MODULES = ("fc_norm", "attn_pool", "head", "head_dist")
# aux_dropout of the gopt_aux_dropout variant and of the demo (see docs/method.md)
AUX_DROPOUT = 0.3


# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BaselineConfig:
    """What a baseline adapter needs besides the backbone (the segmenter reads ``aux_channels``).

    ``variant`` is a label (the registry name) so a printed model says what it is.
    """

    variant: str
    aux_channels: int
    num_classes: int
    head: str = "setr_naive"
    head_channels: int = 256

    def __post_init__(self) -> None:
        for name in ("aux_channels", "num_classes", "head_channels"):
            check_positive_int(name, getattr(self, name))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")


# ---------------------------------------------------------------- building blocks
class FullWidthAuxEmbed(AuxPatchEmbed):
    """``Conv2d(C_aux, D, patch, patch)`` on the backbone's patch grid, starting at zero.

    ``[B, C_aux, H, W] -> [B, S, D]``. Reuses :class:`AuxPatchEmbed` (same kernel, stride and
    padding rule as the frozen RGB patch embedding) without its LayerNorm: a zero-initialised
    conv followed by a LayerNorm gives zero tokens at init but a ~1/sqrt(eps) gradient, so the
    first optimiser step would jump to unit-scale prompts (and a zero LayerNorm gain would
    block every gradient instead). The plain conv is also what the paper's VPT-style
    variants and FFT describe: an embedding of the aux image at the backbone's width.
    """

    def __init__(self, in_chans: int, spec: BackboneSpec) -> None:
        super().__init__(in_chans, spec.embed_dim, spec.patch_size, spec.dynamic_img_pad, norm=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class NarrowAuxEmbed(nn.Module):
    """GoPT's narrow :class:`AuxPatchEmbed` to width ``r``, then ``Linear(r, D)`` starting at zero.

    ``[B, C_aux, H, W] -> [B, S, r] -> [B, S, D]``: the aux branch of the LoRA baseline, at
    about a sixth of a full-width embedding's cost for ViT-B and one aux channel.
    """

    def __init__(self, in_chans: int, dim: int, spec: BackboneSpec) -> None:
        super().__init__()
        self.embed = AuxPatchEmbed(in_chans, dim, spec.patch_size, spec.dynamic_img_pad)
        self.up = nn.Linear(dim, spec.embed_dim)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        xavier_init_(self.embed)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, aux: torch.Tensor) -> torch.Tensor:
        return self.up(self.embed(aux))  # [B, S, r] -> [B, S, D]


# ------------------------------------------------------------------- adapters
class BaselineAdapter(nn.Module, SegmentationAdapter):
    """A baseline's own weights, implementing the adapter contract (:mod:`gopt_adapter.contract`).

    The segmenter calls ``initial_state(aux)`` once per forward and ``prompt(block_index, x,
    state)`` before every block, then ``head`` on the final features. This base class is the
    RGB-only Foundation adapter: a head, and a ``prompt`` that leaves the tokens alone. Its
    state is the aux image itself, which subclasses embed where they need it.
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.head = build_head(config.head, spec.num_features, config.num_classes, config.head_channels)
        xavier_init_(self.head)

    def initial_state(self, aux: torch.Tensor) -> torch.Tensor:
        return aux  # [B, C_aux, H, W], handed unchanged from block to block

    def prompts_at(self, block_index: int) -> bool:
        """Whether ``prompt`` changes the tokens entering block ``block_index``."""
        return False

    def prompt(self, block_index: int, x: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, aux

    def extra_repr(self) -> str:
        return f"variant={self.config.variant!r}"


class AdditiveAuxAdapter(BaselineAdapter):
    """Adds aux tokens to the patch tokens entering block 0: ``x <- x + aux_embed(aux)``.

    FFT-early uses a :class:`FullWidthAuxEmbed` (our earlier, single-stream reading of the
    paper's FFT), LoRA a :class:`NarrowAuxEmbed`. Both start at
    zero, so the model starts as its RGB model.
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec, aux_embed: nn.Module) -> None:
        super().__init__(config, spec)
        self.aux_embed = aux_embed  # [B, C_aux, H, W] -> [B, S, D]

    def prompts_at(self, block_index: int) -> bool:
        return block_index == 0

    def prompt(self, block_index: int, x: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if block_index != 0:
            return x, aux
        return add_to_patch_tokens(x, self.spec.prefix_tokens(0), self.aux_embed(aux)), aux


class VptAdapter(BaselineAdapter):
    """The paper's VPT-style variants: aux embeddings as prompts, multiplied in, not concatenated.

    Before block ``l`` (block 0 only for shallow, every block for deep) the patch tokens
    become ``x * (1 + E_l(aux))`` with ``E_l`` a zero-initialised :class:`FullWidthAuxEmbed`:
    eq. 3's injection with an aux embedding in place of GoPT's grouping prompt.
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec, deep: bool) -> None:
        super().__init__(config, spec)
        self.deep = bool(deep)
        count = spec.depth if self.deep else 1
        self.embeds = nn.ModuleList(FullWidthAuxEmbed(config.aux_channels, spec) for _ in range(count))

    def prompts_at(self, block_index: int) -> bool:
        return block_index < len(self.embeds)

    def prompt(self, block_index: int, x: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if block_index >= len(self.embeds):  # embeds[l] sits before block l, l = 0 .. count - 1
            return x, aux
        delta = self.embeds[block_index](aux)  # E_l(aux), [B, S, D]
        return rescale_patch_tokens(x, self.spec.prefix_tokens(block_index), delta), aux  # x * (1 + E_l(aux))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, deep={self.deep}"


class TwoStreamAdapter(BaselineAdapter):
    """The two-stream FFT's own weights: the aux stream's patch embedding, the fusion and the head.

    ``aux_embed`` (:func:`~gopt_adapter.two_stream.aux_patch_embedding`) ``[B, C_aux, H, W]`` ->
    tokens laid out as the backbone's patch embedding lays out its own; ``fusion``
    (:class:`~gopt_adapter.two_stream.StreamFusion`) mixes the streams' features before the
    head. The per-stream LayerNorms live in the backbone (they replace its own).
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec, aux_embed: nn.Module) -> None:
        super().__init__(config, spec)
        self.aux_embed = aux_embed
        self.fusion = StreamFusion(spec.num_features)


# ------------------------------------------------------------------ segmenter
class BaselineSegmenter(PromptedSegmenter):
    """A segmenter whose backbone may train, holding one baseline adapter.

    ``backbone_training``:

    - ``"frozen"``: exactly GoPT's regime (VPT): no backbone weight trains, eval mode always.
    - ``"full"``: every backbone weight on the feature path trains (all but timm's
      classification tail, :data:`CLASSIFIER_MODULES`) and the backbone follows
      ``train()``/``eval()`` (Foundation, FFT: full fine-tuning, dropout and drop-path active
      in training).
    - ``"lora"``: only the ``lora_`` weights peft put into the backbone train; the backbone
      stays in eval mode as GoPT's does.

    Baselines are benchmark models, not GoPT tasks: adapter files hold GoPT adapters only,
    and a baseline's trained weights may live in the backbone, so it has none of
    :class:`GoptSegmenter`'s adapter-file and multi-adapter methods (``save_adapter`` and
    ``load_adapter`` raise :class:`~gopt_adapter.adapter_io.AdapterError`). Save with
    ``torch.save(segmenter.state_dict(), path)``.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: BaselineAdapter,
                 backbone_training: str = "frozen") -> None:
        if backbone_training not in BACKBONE_TRAINING:
            raise ValueError(f"backbone_training must be one of {BACKBONE_TRAINING}, got {backbone_training!r}")
        super().__init__(model, spec, adapter, DEFAULT_ADAPTER)  # freezes the backbone, eval mode
        self.backbone_training = backbone_training
        for name, param in self.backbone.named_parameters():
            if backbone_training == "full":
                param.requires_grad_(name.split(".", 1)[0] not in CLASSIFIER_MODULES)
            elif backbone_training == "lora" and "lora_" in name:
                param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "BaselineSegmenter":
        super().train(mode)  # backbone back in eval mode
        if getattr(self, "backbone_training", None) == "full":
            self.backbone.train(mode)
        return self

    def extra_repr(self) -> str:
        return f"variant={self.config.variant!r}, backbone_training={self.backbone_training!r}"


class TwoStreamSegmenter(BaselineSegmenter):
    """Table 4 "FFT" as the paper builds it: CEN's two streams through one fully fine-tuned ViT.

    ``features`` runs the RGB and aux streams through the shared blocks
    (:func:`~gopt_adapter.two_stream.two_stream_features`) and fuses them;
    ``regularization_loss`` is CEN's L1 term on the exchange shares of the LayerNorm gains,
    which :class:`~gopt_adapter.engine.Trainer` adds to the loss. The backbone's LayerNorms are
    :class:`~gopt_adapter.two_stream.ModalityLayerNorm` layers, so it only runs two stacked
    streams: ``backbone_features`` (the single-stream RGB pass) is refused.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: TwoStreamAdapter,
                 exchange_l1: float = EXCHANGE_L1) -> None:
        super().__init__(model, spec, adapter, "full")
        self.exchange_l1 = float(exchange_l1)

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """The fused streams' features ``[B, D, h, w]``; every sample needs its aux image."""
        aux, aux_missing = self._missing_aux_inputs(rgb, aux, aux_missing)  # no aux-missing mode: raises
        self._check_inputs(rgb, aux)
        return self.adapter.fusion(*self.stream_features(rgb, aux))

    def stream_features(self, rgb: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stream's final-norm features before the fusion, ``([B, D, h, w], [B, D, h, w])``."""
        if getattr(self.backbone, "grad_checkpointing", False):
            raise RuntimeError("timm's grad checkpointing replays the blocks; use segmenter.set_grad_checkpointing()")
        return two_stream_features(self.backbone, self.adapter.aux_embed, rgb, aux)

    def backbone_features(self, rgb: torch.Tensor) -> NoReturn:
        raise NotImplementedError("the two-stream FFT has no single-stream pass: its LayerNorms take the RGB and "
                                  "aux streams stacked; use stream_features(rgb, aux)")

    def _restore_backbone(self, model: nn.Module) -> None:
        merge_norms(model)  # plain LayerNorms with the fine-tuned RGB tensors

    def exchange_norms(self) -> list[ModalityLayerNorm]:
        return [module for module in self.backbone.modules() if isinstance(module, ModalityLayerNorm)]

    def regularization_loss(self) -> torch.Tensor:
        """``exchange_l1 * sum`` of every :meth:`ModalityLayerNorm.penalty` (CEN's sparsity term)."""
        return self.exchange_l1 * sum(norm.penalty() for norm in self.exchange_norms())

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, exchange_l1={self.exchange_l1:g}"


def _build(model: nn.Module, backbone_training: str,
           make_adapter: Callable[[BackboneSpec], BaselineAdapter],
           prepare: Callable[[nn.Module], None] | None = None) -> BaselineSegmenter:
    """Validates ``model`` and every option before anything changes it, then wraps it."""
    check_unwrapped(model, "a baseline")
    spec = BackboneSpec.from_model(model)
    adapter = make_adapter(spec)
    if prepare is not None:
        prepare(model)
    return BaselineSegmenter(model, spec, adapter, backbone_training)


# ------------------------------------------------------------------- builders
def _build_rgb_only(variant: str, backbone_training: str, model: nn.Module, aux_channels: int, num_classes: int,
                    head: str, head_channels: int) -> BaselineSegmenter:
    """A head on the backbone's RGB features and nothing in front of any block (aux checked, ignored)."""
    config = BaselineConfig(variant, aux_channels, num_classes, head, head_channels)
    return _build(model, backbone_training, lambda spec: BaselineAdapter(config, spec))


def build_foundation(model: nn.Module, num_classes: int, head: str = "setr_naive", *,
                     aux_channels: int = 1, head_channels: int = 256) -> BaselineSegmenter:
    """Table 4 "Foundation": the RGB-only SETR, the whole ViT and the head fine-tuned.

    The call stays ``model(rgb, aux)`` like every variant's; ``aux`` is checked (channel count
    ``aux_channels``, batch and size equal to rgb's) and then ignored, so a benchmark feeds all
    rows the same batches.
    """
    return _build_rgb_only("foundation", "full", model, aux_channels, num_classes, head, head_channels)


def build_probe(model: nn.Module, aux_channels: int, num_classes: int, head: str = "setr_naive", *,
                head_channels: int = 256) -> BaselineSegmenter:
    """The RGB-only row when the foundation stays frozen: the frozen backbone (eval mode) and
    GoPT's default head on its RGB features; only the head trains, ``aux`` is checked and then
    ignored. The floor any use of aux on a frozen backbone must beat (not in the paper).
    """
    return _build_rgb_only("probe", "frozen", model, aux_channels, num_classes, head, head_channels)


def build_fft(model: nn.Module, aux_channels: int, num_classes: int, head: str = "setr_naive", *,
              head_channels: int = 256, exchange_threshold: float = EXCHANGE_THRESHOLD,
              exchange_ratio: float = EXCHANGE_RATIO, exchange_l1: float = EXCHANGE_L1) -> TwoStreamSegmenter:
    """Table 4 "FFT", "extended from the foundation model by adding auxiliary modal branches"
    after CEN: see :class:`TwoStreamSegmenter` and :mod:`gopt_adapter.two_stream`.

    Everything trains: the shared blocks, both streams' LayerNorms, the aux patch embedding,
    the fusion and the head. ``exchange_threshold`` (``>= 0``) and ``exchange_l1`` (``>= 0``) are
    CEN's two settings; ``exchange_ratio`` (``[0, 1)``) the share of each stream's channels
    exchanged at every LayerNorm whatever their gains (ours; both 0: no exchange, see
    :class:`~gopt_adapter.two_stream.ModalityLayerNorm`). ``model`` must be a timm
    ``VisionTransformer`` (``TypeError`` otherwise; ``fft_early`` runs on every family).
    """
    config = BaselineConfig("fft", aux_channels, num_classes, head, head_channels)
    check_exchange_settings(exchange_threshold, exchange_ratio, exchange_l1)
    check_unwrapped(model, "build_fft")
    spec = BackboneSpec.from_model(model)
    check_two_stream_model(model)
    adapter = TwoStreamAdapter(config, spec, aux_patch_embedding(model.patch_embed, aux_channels))
    split_norms(model, exchange_threshold, exchange_ratio)
    return TwoStreamSegmenter(model, spec, adapter, exchange_l1)


def build_fft_early(model: nn.Module, aux_channels: int, num_classes: int, head: str = "setr_naive", *,
                    head_channels: int = 256) -> BaselineSegmenter:
    """FFT-early (ours, not the paper's form): full fine-tuning of one stream with an aux branch
    added to the tokens entering block 0.

    The aux branch is a :class:`FullWidthAuxEmbed` (``Conv2d(C_aux, D, patch, patch)``,
    starting at zero, so FFT-early starts as Foundation). Everything trains.
    """
    config = BaselineConfig("fft_early", aux_channels, num_classes, head, head_channels)
    return _build(model, "full", lambda spec: AdditiveAuxAdapter(config, spec, FullWidthAuxEmbed(aux_channels, spec)))


def build_vpt(model: nn.Module, aux_channels: int, num_classes: int, deep: bool, head: str = "setr_naive", *,
              head_channels: int = 256) -> BaselineSegmenter:
    """Table 4 "VPT-Shallow" (``deep=False``) and "VPT-Deep" (``deep=True``), see :class:`VptAdapter`.

    Frozen backbone in eval mode; the aux embeddings and the head train: for ViT-B, 40
    classes and one aux channel, 197,376 per embedding, so 0.41M (shallow) and 2.58M (deep)
    with the SETR-naive head (paper: 0.54M and 3.39M with its unspecified head).
    """
    if not isinstance(deep, bool):
        raise ValueError(f"deep must be a bool, got {deep!r}")
    config = BaselineConfig("vpt_deep" if deep else "vpt_shallow", aux_channels, num_classes, head, head_channels)
    return _build(model, "frozen", lambda spec: VptAdapter(config, spec, deep))


def _import_peft():
    try:
        import peft
    except ImportError as exc:
        raise ImportError(
            "the LoRA baseline needs peft, an optional extra: pip install 'gopt-adapter[peft]' (or 'peft>=0.12')"
        ) from exc
    return peft


def lora_target_pattern(target_modules: tuple[str, ...]) -> str:
    """Regex (peft full-matches it) for the attention linears of the blocks only.

    ``blocks.<i>.attn.<name>`` for each name: suffix matching would also take
    ``patch_embed.proj`` (a conv) and, for names like ``fc1``, the MLPs.
    """
    names = "|".join(re.escape(name) for name in target_modules)
    return rf"blocks\.\d+\.attn\.(?:{names})"


def _inject_lora(peft, model: nn.Module, target_modules: tuple[str, ...], r: int, alpha: float) -> None:
    """Puts peft LoRA layers (no dropout) on ``blocks.<i>.attn.<target>``; checks the targets first."""
    pattern = lora_target_pattern(target_modules)
    targets = [module for name, module in model.named_modules() if re.fullmatch(pattern, name)]
    if not targets or not all(type(module) is nn.Linear for module in targets):
        found = sorted({name.split(".attn.", 1)[1] for name, module in model.named_modules()
                        if re.fullmatch(r"blocks\.\d+\.attn\.[^.]+", name) and isinstance(module, nn.Linear)})
        raise ValueError(
            f"target_modules {target_modules} must name nn.Linear layers of the blocks' attn; "
            f"this model's attention linears are {found}"
        )
    lora_config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=pattern, lora_dropout=0.0, bias="none")
    peft.inject_adapter_in_model(lora_config, model)


def build_lora(model: nn.Module, aux_channels: int, num_classes: int, r: int = 8, alpha: float = 16,
               target_modules: tuple[str, ...] = ("qkv", "proj"), head: str = "setr_naive", *,
               aux_dim: int = 32, head_channels: int = 256) -> BaselineSegmenter:
    """The baseline a user would reach for today (not in the paper): LoRA plus a narrow aux branch.

    peft puts LoRA (rank ``r``, scale ``alpha / r``, no dropout, ``lora_B`` at zero) on
    ``blocks.<i>.attn.<target>`` for each of ``target_modules`` (timm ViT: ``qkv``, ``proj``;
    the MLP is untouched). The aux image enters through a :class:`NarrowAuxEmbed` of width
    ``aux_dim`` added to the tokens entering block 0. The backbone is otherwise frozen and in
    eval mode. At init the model computes the frozen backbone. Every option is checked before
    peft changes ``model``.
    """
    peft = _import_peft()
    config = BaselineConfig("lora", aux_channels, num_classes, head, head_channels)
    for name, value in (("r", r), ("aux_dim", aux_dim)):
        check_positive_int(name, value)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    if isinstance(target_modules, str) or not target_modules or not all(isinstance(t, str) for t in target_modules):
        raise ValueError(f"target_modules must be a non-empty tuple of module names, got {target_modules!r}")
    return _build(
        model, "lora",
        lambda spec: AdditiveAuxAdapter(config, spec, NarrowAuxEmbed(aux_channels, aux_dim, spec)),
        prepare=lambda m: _inject_lora(peft, m, tuple(target_modules), r, alpha),
    )


def _build_gopt_shallow(model: nn.Module, aux_channels: int, num_classes: int, **options: Any) -> GoptSegmenter:
    """GoPT-Shallow: one grouping prompter, before block 0 (``interval`` = the backbone depth)."""
    if "interval" in options:
        raise ValueError("variant 'gopt_shallow' fixes interval to the backbone depth; choose another variant")
    depth = BackboneSpec.from_model(model).depth
    return apply_gopt(model, aux_channels, num_classes, interval=depth, **options)


def _build_foundation_variant(model: nn.Module, aux_channels: int, num_classes: int, **options: Any) -> nn.Module:
    return build_foundation(model, num_classes, aux_channels=aux_channels, **options)


# ------------------------------------------------------------------- registry
@dataclass(frozen=True)
class Variant:
    """One comparison row: a builder ``(model, aux_channels, num_classes, **options)`` and the
    options it is pinned to (the caller may add others, not override these)."""

    name: str
    builder: Callable[..., nn.Module]
    fixed: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    frozen_backbone: bool = True  # the pretrained weights never change (VPT, LoRA, GoPT)
    paper: str | None = None  # the Table 4 / figure row it reproduces
    summary: str = ""

    def build(self, model: nn.Module, aux_channels: int, num_classes: int, **options: Any) -> nn.Module:
        clash = sorted(set(options) & set(self.fixed))
        if clash:
            raise ValueError(f"variant {self.name!r} fixes {clash} to {dict(self.fixed)}; choose another variant")
        return self.builder(model, aux_channels, num_classes, **self.fixed, **options)


def _variant(name: str, builder: Callable[..., nn.Module], paper: str | None, summary: str,
             frozen_backbone: bool = True, **fixed: Any) -> Variant:
    return Variant(name, builder, MappingProxyType(fixed), frozen_backbone, paper, summary)


_ALL = [
    _variant("foundation", _build_foundation_variant, "Table 4 Foundation",
             "RGB-only SETR, full fine-tuning; aux ignored", frozen_backbone=False),
    _variant("probe", build_probe, None, "frozen backbone + GoPT's head on RGB; aux ignored"),
    _variant("fft", build_fft, "Table 4 FFT",
             "two streams through the shared fine-tuned ViT, per-stream LayerNorms with CEN's channel exchange, "
             "fused before the head", frozen_backbone=False),
    _variant("fft_early", build_fft_early, None,
             "full fine-tuning, full-width aux tokens added before block 0 (one stream)", frozen_backbone=False),
    _variant("vpt_shallow", build_vpt, "Table 4 VPT-Shallow", "x * (1 + E(aux)) before block 0", deep=False),
    _variant("vpt_deep", build_vpt, "Table 4 VPT-Deep", "x * (1 + E_l(aux)) before every block", deep=True),
    _variant("lora", build_lora, None, "LoRA on attn.qkv/attn.proj + narrow aux tokens added before block 0"),
    _variant("gopt", apply_gopt, "Table 4 GoPT", "a grouping prompter before every block", interval=1),
    _variant("gopt_shallow", _build_gopt_shallow, "Table 4 GoPT-Shallow", "one grouping prompter, before block 0"),
    _variant("gopt_no_cup", apply_gopt, "Table 4 GoPT (w/o CUP)", "grouping prompters without CUP", use_cup=False),
    _variant("gopt_no_acp", apply_gopt, "Table 4 GoPT (w/o ACP)", "grouping prompters without ACP", use_acp=False),
    _variant("gopt_rgb_query", apply_gopt, "Table 4 GoPT, eq. 12 as printed",
             "ACP queries with the RGB token alone (no aligned aux token)", acp_query="rgb"),
    _variant("gopt_aux_dropout", apply_gopt, None,
             f"GoPT trained with aux_dropout={AUX_DROPOUT}: it has an aux-missing mode", aux_dropout=AUX_DROPOUT),
    _variant("gopt_soft", apply_gopt, "Fig. 7 soft", "soft instead of hard group assignment", assignment="soft"),
    *(
        _variant(f"gopt_i{interval}", apply_gopt, "Fig. 6", f"a grouping prompter every {interval} blocks",
                 interval=interval)
        for interval in (1, 2, 4, 6, 12)
    ),
]
VARIANTS: Mapping[str, Variant] = MappingProxyType({variant.name: variant for variant in _ALL})


def build_variant(name: str, model: nn.Module, aux_channels: int, num_classes: int, **options: Any) -> nn.Module:
    """Builds the variant ``name`` of :data:`VARIANTS` on ``model`` (a timm ViT holding its weights).

    ``options`` go to the variant's builder (e.g. ``head``, ``r`` for LoRA, GoPT config fields
    such as ``hidden_dim``). Interval variants larger than the backbone depth raise
    ``ValueError`` from :func:`apply_gopt`.
    """
    variant = VARIANTS.get(name)
    if variant is None:
        raise ValueError(f"unknown variant {name!r}; valid variants: {', '.join(VARIANTS)}")
    return variant.build(model, aux_channels, num_classes, **options)


__all__ = [
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
