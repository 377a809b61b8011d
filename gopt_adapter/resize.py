"""Resizing images, samples and logits: bilinear for images and logits, nearest for labels.

Shared by the input pipeline (:class:`~gopt_adapter.preprocessing.ScaleImage`, the data
transforms) and inference (logits back to the label's full size), so a label value is never
invented and evaluation is always at full resolution.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

__all__ = ["Sample", "resize_image", "resize_logits", "resize_sample", "scaled_size"]

#: One sample of a reader: ``rgb`` float ``[3, H, W]``, ``aux`` float ``[C, H, W]``, ``label``
#: int64 ``[H, W]`` and ``meta``.
Sample = dict[str, Any]


def _nearest_indices(src: int, dst: int, device: torch.device) -> torch.Tensor:
    """Source index of each destination pixel for nearest resampling (pixel centres)."""
    idx = ((torch.arange(dst, device=device, dtype=torch.float64) + 0.5) * (src / dst)).floor().long()
    return idx.clamp_(max=src - 1)


def scaled_size(size: Sequence[int], factor: float) -> tuple[int, int]:
    """``(H, W)`` times ``factor``, rounded, at least one pixel."""
    return max(1, round(size[0] * factor)), max(1, round(size[1] * factor))


def resize_image(image: torch.Tensor, size: tuple[int, int], antialias: bool = False) -> torch.Tensor:
    """Bilinear resize of ``[C, H, W]`` or ``[B, C, H, W]`` to ``size`` (H, W); ``antialias``
    low-pass filters first, which shrinking needs to avoid aliasing."""
    batch = image if image.dim() == 4 else image[None]
    resized = F.interpolate(batch, size=size, mode="bilinear", align_corners=False, antialias=antialias)
    return resized if image.dim() == 4 else resized[0]  # [..., C, h', w']


def resize_logits(logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Logits ``[B, K, h, w]`` bilinearly resized to ``size`` (the label's full resolution, where
    the inputs were scaled by ``image_scale``), in float32; unchanged when already that size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return resize_image(logits.float(), tuple(size))  # [B, K, H, W]


def resize_sample(sample: Sample, size: tuple[int, int], antialias: bool = False) -> Sample:
    """Resize rgb/aux bilinearly and the label by nearest neighbour to ``size`` (H, W)."""
    h, w = sample["label"].shape[-2:]
    if (h, w) == tuple(size):
        return sample
    out = dict(sample)
    for key in ("rgb", "aux"):
        out[key] = resize_image(sample[key], size, antialias)  # [C, h', w']
    label = sample["label"]
    rows = _nearest_indices(h, size[0], label.device)
    cols = _nearest_indices(w, size[1], label.device)
    out["label"] = label[rows][:, cols]  # [h', w'], values taken from the input only
    return out
