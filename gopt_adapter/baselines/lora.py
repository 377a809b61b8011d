"""LoRA (peft) on the attention linears plus a narrow aux branch: the baseline a user would reach
for today (not in the paper)."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..adapter import xavier_init_
from ..backbone import BackboneSpec
from ..config import check_positive_int
from ..prompter import AuxPatchEmbed
from .base import AdditiveAuxAdapter, BaselineConfig, BaselineSegmenter, build_baseline

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
    return build_baseline(
        model, "lora",
        lambda spec: AdditiveAuxAdapter(config, spec, NarrowAuxEmbed(aux_channels, aux_dim, spec)),
        prepare=lambda m: _inject_lora(peft, m, tuple(target_modules), r, alpha),
    )
