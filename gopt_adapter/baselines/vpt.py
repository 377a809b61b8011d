"""Table 4's VPT-Shallow and VPT-Deep: aux embeddings as prompts, multiplied into the tokens."""

from __future__ import annotations

from torch import nn

import torch

from ..backbone import BackboneSpec
from ..tokens import rescale_patch_tokens
from .base import BaselineAdapter, BaselineConfig, BaselineSegmenter, FullWidthAuxEmbed, build_baseline

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
    return build_baseline(model, "frozen", lambda spec: VptAdapter(config, spec, deep))
