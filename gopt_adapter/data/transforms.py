"""Joint transforms over the RGB-X sample dict (``rgb``, ``aux``, ``label``, ``meta``).

The input scaling every pipeline shares (mean/std, the fixed ``image_scale`` resize) lives in
:mod:`gopt_adapter.preprocessing`; this module adds the augmentations and builds the pipelines.

Every transform is a callable ``t(sample, generator=None) -> sample`` acting on tensors:
``rgb`` float ``[3, H, W]``, ``aux`` float ``[C, H, W]``, ``label`` int64 ``[H, W]``. Images
are resampled bilinearly, labels always nearest-neighbour (so no label value is invented).

Randomness comes from ``generator`` when given (the same generator state gives the same
output), else from torch's global RNG, which a ``DataLoader`` seeds per worker from its own
seed: a seeded run is reproducible either way.

Training pipeline (:func:`build_transforms` with ``train=True``), in this order:

0. with ``image_scale != 1``, :class:`ScaleImage` resizes every sample by that fixed factor
   (a CPU, or 1280x720 frames, trained at half size); the sizes below are in scaled pixels;
1. :class:`RandomScale` by a factor drawn uniformly from ``scale_range``;
2. :class:`RandomCrop` to ``crop_size``, padding labels with 255 and images with the
   normalisation mean where the image is smaller, so that after step 4 padded image pixels
   are exactly 0 (the common RGB-X code normalises, then pads with 0: same result, but
   cropping first avoids normalising pixels that are thrown away);
3. :class:`RandomHorizontalFlip` with probability ``flip_prob``;
4. :class:`Normalize` (per-modality mean/std).

With ``augment=False`` only what batching needs remains: a :class:`CenterCrop` to
``crop_size`` (padded as in step 2 where the sample is smaller), then :class:`Normalize`; no
random scale, no random window, no flip. The paper trains "without introducing other
algorithms for data expansion"; the configs keep ``augment=True``, reading crop and flip as
standard rather than data expansion (docs/benchmarks.md, "Augmentation").

Evaluation keeps the full size and only normalises; with ``image_scale != 1`` it first resizes
rgb and aux by that factor but keeps the label at full resolution, and
:func:`gopt_adapter.train.engine.evaluate` resizes the logits to the label's size, so metrics are
always measured at full resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import torch

from ..preprocessing import Normalize, NormalizeConfig, ScaleImage, check_image_scale
from ..resize import Sample, resize_sample, scaled_size

__all__ = [
    "TrainTransformConfig",
    "DEFAULT_TRAIN_SETTINGS",
    "Compose",
    "RandomScale",
    "RandomHorizontalFlip",
    "RandomCrop",
    "CenterCrop",
    "default_train_config",
    "build_transforms",
]


def _rand(generator: torch.Generator | None) -> float:
    return float(torch.rand((), generator=generator))


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainTransformConfig:
    """Training augmentation settings.

    Attributes:
        crop_size: ``(height, width)`` of the training crop.
        scale_range: ``(low, high)`` of the uniform random rescale factor.
        flip_prob: probability of a horizontal flip.
        normalize: per-modality mean/std.
        ignore_index: label value of padded pixels.
        augment: random scale, random crop and flip (True), or only a centred crop to
            ``crop_size`` (False); ``scale_range`` and ``flip_prob`` are then unused.
        image_scale: fixed resize factor of every image, in training and in evaluation,
            before anything else (``crop_size`` is in scaled pixels); evaluation still scores
            at the label's full resolution. 1.0 = the images as they are.
    """

    crop_size: tuple[int, int]
    scale_range: tuple[float, float] = (0.5, 1.75)
    flip_prob: float = 0.5
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    ignore_index: int = 255
    augment: bool = True
    image_scale: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.augment, bool):
            raise ValueError(f"augment must be true or false, got {self.augment!r}")
        check_image_scale(self.image_scale)
        crop = tuple(int(v) for v in self.crop_size)
        if len(crop) != 2 or min(crop) < 1:
            raise ValueError(f"crop_size must be two positive ints (height, width), got {self.crop_size}")
        scale = tuple(float(v) for v in self.scale_range)
        if len(scale) != 2 or not 0 < scale[0] <= scale[1]:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {self.scale_range}")
        if not 0.0 <= self.flip_prob <= 1.0:
            raise ValueError(f"flip_prob must be in [0, 1], got {self.flip_prob}")
        if not isinstance(self.normalize, NormalizeConfig):
            raise ValueError(f"normalize must be a NormalizeConfig, got {type(self.normalize).__name__}")
        object.__setattr__(self, "crop_size", crop)
        object.__setattr__(self, "scale_range", scale)
        object.__setattr__(self, "image_scale", float(self.image_scale))


#: Usual training settings per dataset (``docs/datasets.md``); crop is (height, width).
DEFAULT_TRAIN_SETTINGS: dict[str, dict[str, Any]] = {
    "nyudv2": {"crop_size": (480, 640), "scale_range": (0.5, 1.75)},
    "sunrgbd": {"crop_size": (480, 480), "scale_range": (0.5, 1.75)},
    "mfnet": {"crop_size": (480, 640), "scale_range": (0.5, 1.75)},
    "pst900": {"crop_size": (720, 1280), "scale_range": (0.5, 1.75)},
    "whu_opt_sar": {"crop_size": (512, 512), "scale_range": (0.5, 1.75)},
    "synthetic": {"crop_size": (128, 128), "scale_range": (0.75, 1.25)},
    # your own folder or CMX / DFormer layout: this crop only when its images differ in size (else
    # their size, see recipe)
    "folder": {"crop_size": (512, 512), "scale_range": (0.5, 1.75)},
    "rgbx": {"crop_size": (512, 512), "scale_range": (0.5, 1.75)},
}


# --------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------
class Compose:
    """Apply transforms in order, passing the same generator to each."""

    def __init__(self, transforms: Sequence[Any]) -> None:
        self.transforms = list(transforms)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        for t in self.transforms:
            sample = t(sample, generator)
        return sample

    def __repr__(self) -> str:
        return "Compose(" + ", ".join(repr(t) for t in self.transforms) + ")"


class RandomScale:
    """Rescale by a factor drawn uniformly from ``scale_range`` (both sides, same factor)."""

    def __init__(self, scale_range: tuple[float, float]) -> None:
        self.scale_range = scale_range

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        lo, hi = self.scale_range
        factor = lo + (hi - lo) * _rand(generator)
        return resize_sample(sample, scaled_size(sample["label"].shape[-2:], factor))

    def __repr__(self) -> str:
        return f"RandomScale({self.scale_range})"


class RandomHorizontalFlip:
    """Flip rgb, aux and label left-right together with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        if _rand(generator) >= self.p:
            return sample
        out = dict(sample)
        for key in ("rgb", "aux", "label"):
            out[key] = sample[key].flip(-1)
        return out

    def __repr__(self) -> str:
        return f"RandomHorizontalFlip(p={self.p})"


class RandomCrop:
    """Random ``size`` crop, padding where the sample is smaller than the crop.

    The sample is (virtually) padded at the bottom/right up to ``size`` and a window is
    drawn uniformly; padded pixels get ``rgb_fill`` / ``aux_fill`` (one value, or one per
    channel) and ``label_fill`` (the ignore value). Only the window is materialised.
    """

    def __init__(self, size: tuple[int, int], rgb_fill: float | Sequence[float] = 0.0,
                 aux_fill: float | Sequence[float] = 0.0, label_fill: int = 255) -> None:
        self.size = size
        self.fills = {"rgb": rgb_fill, "aux": aux_fill, "label": label_fill}

    def _window(self, x: torch.Tensor, fill: float | Sequence[float], top: int, left: int) -> torch.Tensor:
        ch, cw = self.size
        src = x[..., top : top + ch, left : left + cw]  # [..., <=ch, <=cw]
        if src.shape[-2:] == (ch, cw):
            return src
        fill_t = torch.as_tensor(fill, dtype=x.dtype, device=x.device)
        if x.dim() == 3:
            fill_t = fill_t.reshape(-1, 1, 1)  # one value per channel, or one for all
        out = fill_t.expand(*x.shape[:-2], ch, cw).clone()  # [..., ch, cw]
        out[..., : src.shape[-2], : src.shape[-1]] = src
        return out

    def _offsets(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        ch, cw = self.size
        return int(_rand(generator) * (max(height, ch) - ch + 1)), int(_rand(generator) * (max(width, cw) - cw + 1))

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        top, left = self._offsets(*sample["label"].shape[-2:], generator)
        out = dict(sample)
        for key in ("rgb", "aux", "label"):
            out[key] = self._window(sample[key], self.fills[key], top, left)
        return out

    def __repr__(self) -> str:
        return f"RandomCrop(size={self.size}, fills={self.fills})"


class CenterCrop(RandomCrop):
    """The centred ``size`` window (rounded up-left), padded as :class:`RandomCrop` pads; draws nothing."""

    def _offsets(self, height: int, width: int, generator: torch.Generator | None) -> tuple[int, int]:
        ch, cw = self.size
        return max(height - ch, 0) // 2, max(width - cw, 0) // 2

    def __repr__(self) -> str:
        return f"CenterCrop(size={self.size}, fills={self.fills})"


# --------------------------------------------------------------------------------------
# Builders
# --------------------------------------------------------------------------------------
def default_train_config(name: str, **overrides: Any) -> TrainTransformConfig:
    """The usual training config of dataset ``name`` with fields replaced by ``overrides``."""
    key = name.lower().replace("-", "_")
    if key not in DEFAULT_TRAIN_SETTINGS:
        raise ValueError(f"no default transform settings for {name!r}; known: {sorted(DEFAULT_TRAIN_SETTINGS)}")
    return replace(TrainTransformConfig(**DEFAULT_TRAIN_SETTINGS[key]), **overrides)


def build_transforms(
    name: str,
    train: bool,
    config: TrainTransformConfig | None = None,
    normalize: NormalizeConfig | None = None,
) -> Compose:
    """Training or evaluation transforms for dataset ``name`` from ``config`` (default:
    :func:`default_train_config`).

    ``train=True`` builds scale -> crop -> flip -> normalise, or centred crop -> normalise
    with ``config.augment`` off; ``train=False`` only normalises, at full size. Either starts
    with a :class:`ScaleImage` when ``config.image_scale != 1`` (evaluation: rgb/aux only).
    ``normalize`` overrides the mean/std of either.
    """
    if name.lower().replace("-", "_") not in DEFAULT_TRAIN_SETTINGS:
        raise ValueError(f"unknown dataset {name!r}; known: {sorted(DEFAULT_TRAIN_SETTINGS)}")
    config = config or default_train_config(name)
    if normalize is not None:
        config = replace(config, normalize=normalize)
    norm = config.normalize
    rescale = [ScaleImage(config.image_scale, label=train)] if config.image_scale != 1 else []
    if not train:
        return Compose([*rescale, Normalize(norm)])
    # padding with the mean makes padded pixels exactly 0 after normalisation
    fills = dict(rgb_fill=norm.rgb_mean, aux_fill=norm.aux_mean, label_fill=config.ignore_index)
    if not config.augment:
        return Compose([*rescale, CenterCrop(config.crop_size, **fills), Normalize(norm)])
    return Compose([
        *rescale,
        RandomScale(config.scale_range),
        RandomCrop(config.crop_size, **fills),
        RandomHorizontalFlip(config.flip_prob),
        Normalize(norm),
    ])
