"""Tiny timm backbones of every supported family, built with random weights (no hub here), and
the helpers the tests share: inputs, bitwise snapshots, adapter perturbation, model stand-ins.

A plain module the test files import (as ``datasets_helpers``), not ``conftest.py``: pytest's
controller process loads ``conftest.py`` before it starts its workers, and it runs no test, so
``conftest.py`` stays free of torch and timm.
"""

from __future__ import annotations

import timm
import torch

# name -> (timm model name, constructor overrides, an input size (H, W) the model accepts)
FAMILIES: dict[str, tuple[str, dict, tuple[int, int]]] = {
    "vit": ("vit_base_patch16_224", dict(img_size=64, dynamic_img_size=True), (48, 80)),
    "vit_mae": ("vit_base_patch16_224.mae", dict(img_size=64, dynamic_img_size=True), (32, 64)),
    "deit": ("deit_tiny_patch16_224", dict(img_size=64, dynamic_img_size=True), (64, 48)),
    "deit_distilled": ("deit_tiny_distilled_patch16_224", dict(img_size=64, dynamic_img_size=True), (48, 80)),
    "deit3": ("deit3_small_patch16_224", dict(img_size=64, dynamic_img_size=True), (48, 64)),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", dict(img_size=56, dynamic_img_size=True, dynamic_img_pad=True), (50, 61)),
    "vit_gap": ("vit_base_patch16_reg4_gap_256", dict(img_size=64, dynamic_img_size=True), (48, 80)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=56, dynamic_img_size=True, dynamic_img_pad=True), (43, 57)),
    "beit": ("beit_base_patch16_224", dict(img_size=64), (64, 64)),
    "samvit": ("samvit_base_patch16", dict(img_size=64, global_attn_indexes=(1,), window_size=2), (64, 64)),
}
TINY = dict(embed_dim=32, depth=2, num_heads=2)


def make_backbone(family: str = "vit", depth: int = 2, seed: int = 0) -> torch.nn.Module:
    """A small random-weight backbone of ``family`` in eval mode (same seed, same weights)."""
    name, kwargs, _ = FAMILIES[family]
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False, **{**TINY, "depth": depth, **kwargs}).eval()


def family_inputs(family: str = "vit", batch: int = 2, aux_channels: int = 1, seed: int = 1):
    _, _, (height, width) = FAMILIES[family]
    generator = torch.Generator().manual_seed(seed)
    rgb = torch.randn(batch, 3, height, width, generator=generator)
    aux = torch.randn(batch, aux_channels, height, width, generator=generator)
    return rgb, aux


def snapshot(module: torch.nn.Module) -> list[torch.Tensor]:
    """Clones of every state tensor in registration order (names change under wrapping)."""
    return [t.detach().clone() for t in module.state_dict().values()]


def assert_bitwise_equal(before: list[torch.Tensor], after: list[torch.Tensor]) -> None:
    assert len(before) == len(after)
    for a, b in zip(before, after):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8))


def perturb_adapter(segmenter, std: float = 0.05, seed: int = 0) -> None:
    """Moves every adapter weight away from its initial value (up-projections included)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in segmenter.adapter.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * std)
        for name, buffer in segmenter.adapter.named_buffers():
            if buffer.is_floating_point():
                buffer.add_(torch.rand(buffer.shape, generator=generator) * std)


class PixelModel(torch.nn.Module):
    """Per-pixel model (a 1x1 convolution of rgb + aux to 3 classes): any window of it equals the
    same window of the whole image, and its mirrored input gives its mirrored output."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)

    def forward(self, rgb, aux):
        return self.conv(torch.cat([rgb, aux], 1))


def with_logits(build_variant, edit):
    """``build_variant`` whose models pass their logits through ``edit`` (a forward hook): a
    model that diverges or collapses on demand, trained by the real recipe."""

    def build(*args, **kwargs):
        model = build_variant(*args, **kwargs)
        model.register_forward_hook(lambda module, inputs, logits: edit(logits))
        return model

    return build


def nan_logits(logits):
    """Logits turned NaN, for :func:`with_logits`: a run that diverges from its first step."""
    return logits * float("nan")
