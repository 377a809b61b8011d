"""Tiny timm backbones of every supported family, built with random weights (no hub here)."""

from __future__ import annotations

import os
import warnings

import pytest
import timm
import torch

warnings.filterwarnings("ignore", category=UserWarning, module="timm")

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


if os.environ.get("PYTEST_XDIST_WORKER"):  # scripts/test.sh: one process per core, one thread each
    torch.set_num_threads(1)

# The test files that take longest (seconds on a 2-core machine, from ``--durations``), run
# first: scripts/test.sh hands whole files to its two processes in collection order
# (``--dist loadfile --no-loadscope-reorder``), so long files first and short ones last lets
# both finish together (xdist's own order, most tests first, left the long one-test files
# for the end, one process idle for a minute). The figures set an order, never a result.
LONGEST_FIRST = {
    "test_zoo.py": 60, "test_export.py": 58, "test_gpu_check.py": 42, "test_compile.py": 34,
    "test_field.py": 28, "test_api_doc.py": 28, "test_learning.py": 25, "test_runner.py": 21,
    "test_engine.py": 20, "test_wheel.py": 19, "test_cli.py": 14, "test_readme.py": 11,
    "test_swaps.py": 9, "test_adapter_io.py": 9, "test_baselines.py": 8, "test_ablation.py": 6,
}


def pytest_collection_modifyitems(items):
    items.sort(key=lambda item: -LONGEST_FIRST.get(item.path.name, 0))  # stable: file order kept otherwise


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


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def backbone():
    return make_backbone("vit")
