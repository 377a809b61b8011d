"""What a segmenter costs, as ``gopt bench`` reports it: parameters, FLOPs, latency and memory.

Measured on the model as it runs (eval mode, no gradients), on random inputs of the asked
size and batch, so that any adapter file (or a fresh GoPT adapter on a named timm backbone)
is measured from a pip install, as DFormer's ``benchmark.py`` or mmseg's ``get_flops.py``:

- parameters: trainable (the adapter) and total (backbone included);
- GFLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward of one image
  (it counts matrix multiplications and convolutions, two FLOPs per multiply-add; element-wise
  operations, softmax and normalisation are not counted);
- latency: the median over ``repeats`` timed forwards of the whole batch after ``warmup``
  untimed ones (CUDA synchronised around each), and the images per second it gives;
- peak memory: on CUDA the peak of ``torch.cuda.max_memory_allocated`` over the timed forwards;
  on the CPU the process's peak resident set size (it includes Python, torch and the weights).
"""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..parameters import count_parameters

__all__ = ["gflops_per_image", "measure", "ratios", "synchronize", "timed_call"]


def synchronize(device: torch.device) -> None:
    """Waits for ``device``'s queued kernels (CUDA runs them asynchronously); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def timed_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, ``device`` synchronised before and after it (CUDA
    kernels run asynchronously, so an unsynchronised clock times only their launch)."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def gflops_per_image(model: nn.Module, rgb: torch.Tensor, aux: torch.Tensor) -> float:
    """GFLOPs of ``model`` on the first image of ``rgb [B, 3, H, W]`` / ``aux [B, A, H, W]``,
    as ``torch.utils.flop_counter`` counts them (matrix products and convolutions, two FLOPs
    per multiply-add)."""
    counter = FlopCounterMode(display=False)
    with counter:  # with autograd on: the counter's module tracker hooks the inputs' gradient functions
        model(rgb[:1], aux[:1])
    return counter.get_total_flops() / 1e9


def measure(model: nn.Module, size: tuple[int, int], batch: int, aux_channels: int, device: torch.device,
            repeats: int = 10, warmup: int = 3, seed: int = 0) -> dict[str, Any]:
    """Parameters, GFLOPs per image, median latency of a batch, images/s and peak memory of
    ``model(rgb [batch, 3, H, W], aux [batch, aux_channels, H, W])`` on ``device``."""
    if repeats < 1 or warmup < 0 or batch < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0 and batch >= 1, got {repeats}, {warmup}, {batch}")
    params = count_parameters(model)
    model = model.to(device).eval()
    generator = torch.Generator().manual_seed(seed)
    height, width = size
    rgb = torch.randn(batch, 3, height, width, generator=generator).to(device)
    aux = torch.randn(batch, aux_channels, height, width, generator=generator).to(device)
    gflops = gflops_per_image(model, rgb, aux)
    with torch.no_grad():
        for _ in range(warmup):
            model(rgb, aux)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        latency = statistics.median(timed_call(lambda: model(rgb, aux), device) for _ in range(repeats))
    return {
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "gflops_per_image": gflops,
        "latency_ms": latency * 1e3,
        "images_per_s": batch / latency,
        "peak_memory_mb": _peak_memory_mb(device),
        "peak_memory_kind": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


def ratios(ours: dict[str, Any], reference: dict[str, Any]) -> dict[str, float | None]:
    """``ours / reference`` for every figure they share that both measured as a number > 0;
    peak memory only on CUDA (a process's peak RSS holds everything it ever loaded)."""
    keys = ("trainable_parameters", "total_parameters", "gflops_per_image", "latency_ms")
    if ours.get("peak_memory_kind") == reference.get("peak_memory_kind") == "cuda max_memory_allocated":
        keys += ("peak_memory_mb",)
    out: dict[str, float | None] = {}
    for key in keys:
        a, b = ours.get(key), reference.get(key)
        out[key] = a / b if isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > 0 and \
            math.isfinite(a) else None
    return out
