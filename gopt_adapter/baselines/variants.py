"""The registry of comparison rows (paper Table 4, Fig. 6 and 7): :data:`VARIANTS` and
:func:`build_variant`, GoPT's variants beside the baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from torch import nn

from ..backbone import BackboneSpec
from ..gopt_segmenter import GoptSegmenter, apply_gopt
from .base import build_foundation, build_probe
from .fft import build_fft, build_fft_early
from .lora import build_lora
from .vpt import build_vpt

# aux_dropout of the gopt_aux_dropout variant and of the demo (see docs/method.md)
AUX_DROPOUT = 0.3


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
