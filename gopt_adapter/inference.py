"""Class scores of one prepared input: whole, by sliding window, or over test-time augmentations.

One implementation of each, shared by :func:`gopt_adapter.train.engine.evaluate` (``gopt eval``,
training's evaluations) and :func:`gopt_adapter.cli.predict.predict_labels` (``gopt predict``).
The input is what the model takes (normalised, already resized by ``image_scale``); the scores
come back at the size the caller asks for (the label's, or the image file's).

* :func:`segment`: the logits of the whole input, or of overlapping ``window``-sized crops
  averaged where they overlap (:func:`sliding_window_logits`, mmseg's ``mode="slide"``).
* :class:`TTAConfig` and :func:`tta_scores`: test-time augmentation. The input is resized by
  each of ``scales`` (rgb and aux alike; bilinear, antialiased when shrinking, as ``image_scale``
  resizes) and, with ``flip``, also mirrored left-right; each view's logits are mirrored back,
  resized to the output size, turned into softmax probabilities, and the probabilities are
  averaged. This is mmseg's ``aug_test`` / ``SegTTAModel`` and DFormer's ``--mst`` evaluation
  (mean softmax, not mean logits). A view at scale 1 keeps the input's size; other views are
  rounded up to the sizes the backbone takes (DFormer rounds to multiples of 32). A single
  view (scales ``[1]``, no flip) returns its logits unchanged: the same arg-max, and plain
  evaluation bit for bit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .preprocessing import check_image_scale
from .resize import resize_image, resize_logits, scaled_size

__all__ = [
    "TTAConfig",
    "NO_TTA",
    "check_window",
    "window_starts",
    "sliding_window_logits",
    "segment",
    "size_multiple",
    "view_size",
    "tta_scores",
]

Forward = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


# ------------------------------------------------------------------ sliding window
def check_window(window: int | None, stride: int | None, prefix: str = "") -> None:
    """Validates sliding-window settings: ``window > 0`` and ``0 < stride <= window`` (a larger
    stride would leave pixels that no window covers)."""
    if window is None:
        if stride is not None:
            raise ValueError(f"{prefix}stride ({stride}) needs {prefix}window")
        return
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"{prefix}window must be a positive integer, got {window!r}")
    if stride is not None and not (isinstance(stride, int) and 0 < stride <= window):
        raise ValueError(f"{prefix}stride must be in 1..{prefix}window: got {prefix}stride {stride!r} "
                         f"with {prefix}window {window}")


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis: every ``stride`` pixels, plus one window flush with the
    border; ``[0]`` when the axis fits in one window (the crop is then the whole axis)."""
    check_window(window, stride)
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)  # last window flush with the border
    return starts


def sliding_window_logits(model: Forward, rgb: torch.Tensor, aux: torch.Tensor | None, num_classes: int,
                          window: int, stride: int | None = None) -> torch.Tensor:
    """Average of the logits of overlapping ``window``-sized crops covering the image.

    ``stride`` (default ``window``) must lie in ``1..window``; the last window of each axis is
    flush with the border, so every pixel is covered at least once. ``aux=None`` (the adapter's
    aux-missing mode) runs every crop without aux.
    """
    check_window(window, stride)
    stride = window if stride is None else stride
    height, width = rgb.shape[-2:]
    if height <= window and width <= window:
        return model(rgb, aux)
    logits = rgb.new_zeros(rgb.shape[0], num_classes, height, width, dtype=torch.float32)  # [B, K, H, W]
    counts = rgb.new_zeros(1, 1, height, width, dtype=torch.float32)  # windows covering each pixel
    for top in window_starts(height, window, stride):
        for left in window_starts(width, window, stride):
            crop = (..., slice(top, top + window), slice(left, left + window))
            logits[crop] += model(rgb[crop], None if aux is None else aux[crop]).float()
            counts[crop] += 1
    return logits / counts


def segment(model: Forward, rgb: torch.Tensor, aux: torch.Tensor | None, num_classes: int,
            window: int | None = None, stride: int | None = None) -> torch.Tensor:
    """Logits ``[B, K, H, W]`` of the whole input, or by sliding window when ``window`` is given."""
    if window is None:
        check_window(window, stride)
        return model(rgb, aux)
    return sliding_window_logits(model, rgb, aux, num_classes, window, stride)


# ------------------------------------------------------------------ test-time augmentation
@dataclass(frozen=True)
class TTAConfig:
    """Test-time augmentation: the input at each of ``scales``, and mirrored left-right too with
    ``flip`` (``len(scales) * (2 if flip else 1)`` forward passes per image)."""

    scales: tuple[float, ...] = (0.75, 1.0, 1.25)
    flip: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.scales, (str, bytes)) or not isinstance(self.scales, Sequence) or not self.scales:
            raise ValueError(f"TTA scales must be a non-empty list of numbers > 0, got {self.scales!r}")
        for scale in self.scales:
            check_image_scale(scale, "a TTA scale")
        scales = tuple(float(scale) for scale in self.scales)
        if len(set(scales)) != len(scales):
            raise ValueError(f"TTA scales must differ from each other, got {list(scales)}")
        if not isinstance(self.flip, bool):
            raise ValueError(f"TTA flip must be true or false, got {self.flip!r}")
        object.__setattr__(self, "scales", scales)

    @property
    def views(self) -> list[tuple[float, bool]]:
        """``(scale, mirrored)`` of every forward pass, in the order they run."""
        return [(scale, mirrored) for scale in self.scales for mirrored in ((False, True) if self.flip else (False,))]

    def describe(self) -> str:
        """E.g. ``scales 0.75 1 1.25, flip`` (what ``gopt eval`` prints)."""
        return f"scales {' '.join(f'{s:g}' for s in self.scales)}{', flip' if self.flip else ''}"


#: One view of the input as it is: :func:`tta_scores` then returns the model's own logits.
NO_TTA = TTAConfig(scales=(1.0,))


def size_multiple(model: Any) -> tuple[int, int]:
    """What input heights and widths must be multiples of: a segmenter's backbone says
    (``spec.size_multiple``; ``(1, 1)`` with ``dynamic_img_pad``); any other model is taken to
    accept every size."""
    spec = getattr(model, "spec", None)
    return tuple(spec.size_multiple) if spec is not None else (1, 1)


def view_size(size: Sequence[int], scale: float, multiple: Sequence[int] = (1, 1)) -> tuple[int, int]:
    """``(h, w)`` of the view at ``scale``: the input's own size at scale 1, else the scaled size
    rounded up to ``multiple`` (as DFormer rounds its scales up to multiples of 32)."""
    if scale == 1:
        return int(size[0]), int(size[1])
    height, width = scaled_size(size, scale)
    return math.ceil(height / multiple[0]) * multiple[0], math.ceil(width / multiple[1]) * multiple[1]


def tta_scores(forward: Forward, rgb: torch.Tensor, aux: torch.Tensor | None, size: Sequence[int],
               tta: TTAConfig = NO_TTA, multiple: Sequence[int] = (1, 1)) -> torch.Tensor:
    """Class scores ``[B, K, *size]`` whose arg-max is the prediction.

    ``forward(rgb, aux) -> logits`` runs once per view of :class:`TTAConfig` (e.g.
    ``functools.partial(segment, model, num_classes=K, window=...)``); each view's logits are
    mirrored back where it was mirrored and resized to ``size`` (float32) before the views'
    softmax probabilities are averaged. With a single view its resized logits are returned as
    they are. ``multiple``: the size multiple the model needs (:func:`size_multiple`).
    """
    views = tta.views
    total = None
    for scale, mirrored in views:
        height, width = view_size(rgb.shape[-2:], scale, multiple)
        shrink = height < rgb.shape[-2] or width < rgb.shape[-1]
        inputs = [None if x is None else x if scale == 1 else resize_image(x, (height, width), antialias=shrink)
                  for x in (rgb, aux)]  # [B, C, h, w] each
        if mirrored:
            inputs = [None if x is None else x.flip(-1) for x in inputs]
        logits = forward(*inputs)  # [B, K, h, w]
        if mirrored:
            logits = logits.flip(-1)
        logits = resize_logits(logits, tuple(size))  # [B, K, *size]
        if len(views) == 1:
            return logits
        probabilities = logits.float().softmax(1)
        total = probabilities if total is None else total + probabilities
    return total / len(views)
