"""Input scaling, in one place: how raw image files become the tensors an adapter was trained on.

A model trained on NYUDv2 saw millimetre depth divided by 10000 and normalised with ImageNet
statistics; running it on a depth PNG divided by 65535 silently gives poor predictions. A
:class:`Preprocessing` records both steps so that ``gopt predict`` can repeat them:

1. the auxiliary image to [0, 1]: ``"fixed"`` divides by ``aux_max`` (``None``: the file
   dtype's maximum, 255 or 65535) and clips, ``"per_image"`` min-max scales each image;
2. per-modality mean/std (a :class:`~gopt_adapter.preprocessing.NormalizeConfig`);
3. the fixed resize factor of the inputs (``transforms.image_scale``; predictions are resized
   back to the input's full size).

RGB is always divided by its dtype maximum, as every reader does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Mapping, get_args

import numpy as np
import torch

from .resize import Sample, resize_image, resize_sample, scaled_size

__all__ = [
    "AUX_NORMALIZATIONS",
    "AuxNormalization",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Normalize",
    "NormalizeConfig",
    "Preprocessing",
    "ScaleImage",
    "check_aux_channels",
    "check_image_scale",
    "dataset_preprocessing",
    "dtype_max",
    "scale_to_unit",
]

# ------------------------------------------------------------------ raw values to [0, 1]
#: How an auxiliary modality (depth, thermal, SAR) is mapped to [0, 1]:
#: ``"fixed"`` divides by a fixed maximum (the dtype's maximum unless the reader states
#: another, e.g. 10 m for millimetre depth) and clips to [0, 1], so values stay comparable
#: across images; ``"per_image"`` min-max scales each image to [0, 1] (a constant image
#: becomes all zeros).
AuxNormalization = Literal["fixed", "per_image"]
#: The values of :data:`AuxNormalization`, for validating options (``check_choice``).
AUX_NORMALIZATIONS: tuple[str, ...] = get_args(AuxNormalization)


def dtype_max(arr: np.ndarray, path: Path) -> float:
    """The maximum of an integer dtype (255 for uint8, 65535 for uint16, ...)."""
    if arr.dtype.kind not in "ui":
        raise ValueError(
            f"{path}: 'fixed' normalisation by dtype needs an integer image, found "
            f"{arr.dtype.name}; use 'per_image' normalisation for float data"
        )
    return float(np.iinfo(arr.dtype).max)


def scale_to_unit(
    arr: np.ndarray, mode: AuxNormalization, max_value: float | None, path: Path
) -> np.ndarray:
    """Map an image to float32 in [0, 1] following ``mode`` (see :data:`AuxNormalization`).

    ``max_value`` is the divisor for ``"fixed"``; ``None`` means the dtype's maximum.
    """
    if mode == "fixed":
        divisor = dtype_max(arr, path) if max_value is None else float(max_value)
        out = arr.astype(np.float32) / np.float32(divisor)
        return np.clip(out, 0.0, 1.0, out=out)
    if mode == "per_image":
        out = arr.astype(np.float32)
        finite = np.isfinite(out)
        if not finite.all():
            out[~finite] = 0.0
        lo, hi = float(out.min()), float(out.max())
        if hi <= lo:
            return np.zeros_like(out)
        return (out - np.float32(lo)) / np.float32(hi - lo)
    raise ValueError(f"unknown normalisation {mode!r}; choose one of {AUX_NORMALIZATIONS}")


# ------------------------------------------------------------------ mean/std and the fixed resize
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class NormalizeConfig:
    """Per-modality mean/std applied to images in [0, 1].

    ``aux_mean``/``aux_std`` hold one value (broadcast to every aux channel) or one per
    channel. The aux default (0.5, 0.5) maps [0, 1] to [-1, 1].
    """

    rgb_mean: tuple[float, ...] = IMAGENET_MEAN
    rgb_std: tuple[float, ...] = IMAGENET_STD
    aux_mean: tuple[float, ...] = (0.5,)
    aux_std: tuple[float, ...] = (0.5,)

    def __post_init__(self) -> None:
        for name in ("rgb_mean", "rgb_std", "aux_mean", "aux_std"):
            value = tuple(float(v) for v in getattr(self, name))
            object.__setattr__(self, name, value)
            if not value:
                raise ValueError(f"{name} must not be empty")
        if len(self.rgb_mean) != 3 or len(self.rgb_std) != 3:
            raise ValueError(f"rgb_mean and rgb_std need 3 values, got {self.rgb_mean}, {self.rgb_std}")
        if min(self.rgb_std + self.aux_std) <= 0:
            raise ValueError(f"rgb_std and aux_std must be > 0, got {self.rgb_std}, {self.aux_std}")


def check_image_scale(factor: Any, name: str = "image_scale") -> None:
    """Raises ``ValueError`` unless ``factor`` is a finite number > 0 (``image_scale``, or the
    resize factor ``name``)."""
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (math.isfinite(factor) and factor > 0):
        raise ValueError(f"{name} must be a finite number > 0 (0.5 = half size), got {factor!r}")


class Normalize:
    """``(x - mean) / std`` per channel for rgb and aux (aux stats broadcast if length 1)."""

    def __init__(self, config: NormalizeConfig = NormalizeConfig()) -> None:
        self.config = config
        self._rgb_mean = torch.tensor(config.rgb_mean).view(-1, 1, 1)
        self._rgb_std = torch.tensor(config.rgb_std).view(-1, 1, 1)
        self._aux_mean = torch.tensor(config.aux_mean).view(-1, 1, 1)
        self._aux_std = torch.tensor(config.aux_std).view(-1, 1, 1)

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        aux = sample["aux"]
        if self._aux_mean.shape[0] not in (1, aux.shape[0]) or self._aux_std.shape[0] not in (1, aux.shape[0]):
            raise ValueError(
                f"aux has {aux.shape[0]} channels but aux_mean/aux_std have "
                f"{self._aux_mean.shape[0]}/{self._aux_std.shape[0]} values"
            )
        out = dict(sample)
        rgb = sample["rgb"]
        out["rgb"] = (rgb - self._rgb_mean.to(rgb)) / self._rgb_std.to(rgb)
        out["aux"] = (aux - self._aux_mean.to(aux)) / self._aux_std.to(aux)
        return out

    def __repr__(self) -> str:
        return f"Normalize({self.config})"


class ScaleImage:
    """Resize by the fixed ``factor`` of ``image_scale``: rgb/aux bilinear (antialiased when
    shrinking), the label nearest, or left at full resolution with ``label=False`` (evaluation:
    the logits are resized to it, so metrics stay at full resolution). Draws nothing."""

    def __init__(self, factor: float, label: bool = True) -> None:
        check_image_scale(factor)
        self.factor = float(factor)
        self.label = label

    def __call__(self, sample: Sample, generator: torch.Generator | None = None) -> Sample:
        size = scaled_size(sample["rgb"].shape[-2:], self.factor)
        antialias = self.factor < 1
        if self.label:
            return resize_sample(sample, size, antialias)
        out = dict(sample)
        for key in ("rgb", "aux"):
            out[key] = resize_image(sample[key], size, antialias)  # [C, h', w']; label stays [H, W]
        return out

    def __repr__(self) -> str:
        return f"ScaleImage({self.factor:g}, label={self.label})"


# ------------------------------------------------------------------ the record an adapter keeps


#: Identity normalisation: what a model trained without a ``Normalize`` transform saw.
_NO_NORMALIZE = NormalizeConfig(rgb_mean=(0.0, 0.0, 0.0), rgb_std=(1.0, 1.0, 1.0), aux_mean=(0.0,), aux_std=(1.0,))


def check_aux_channels(normalize: NormalizeConfig, channels: int) -> None:
    """Raises ``ValueError`` unless ``aux_mean``/``aux_std`` hold one value or one per aux channel."""
    for name in ("aux_mean", "aux_std"):
        count = len(getattr(normalize, name))
        if count not in (1, channels):
            raise ValueError(f"{name} has {count} values for {channels} aux channel(s); give one, or one per channel")


@dataclass(frozen=True)
class Preprocessing:
    """Aux scaling to [0, 1] and the mean/std normalisation an adapter was trained with.

    Attributes:
        aux_scale: ``"fixed"`` (divide by ``aux_max`` and clip) or ``"per_image"`` (min-max).
        aux_max: divisor of ``"fixed"`` (e.g. 10000 for millimetre depth); ``None`` = the
            dtype maximum of the file. Must be ``None`` for ``"per_image"``.
        normalize: per-modality mean/std applied after scaling.
        image_scale: resize factor of rgb and aux before the model (1.0: none).
    """

    aux_scale: str = "fixed"
    aux_max: float | None = None
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    image_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.aux_scale not in AUX_NORMALIZATIONS:
            raise ValueError(f"aux_scale must be one of {AUX_NORMALIZATIONS}, got {self.aux_scale!r}")
        if self.aux_max is not None:
            if isinstance(self.aux_max, bool) or not isinstance(self.aux_max, (int, float)):
                raise ValueError(f"aux_max must be a number or None, got {self.aux_max!r}")
            if not (math.isfinite(self.aux_max) and self.aux_max > 0):
                raise ValueError(f"aux_max must be a finite number > 0, got {self.aux_max}")
            if self.aux_scale != "fixed":
                raise ValueError(f"aux_max ({self.aux_max}) only applies to aux_scale 'fixed', not {self.aux_scale!r}")
            object.__setattr__(self, "aux_max", float(self.aux_max))
        if not isinstance(self.normalize, NormalizeConfig):
            raise ValueError(f"normalize must be a NormalizeConfig, got {type(self.normalize).__name__}")
        values = [v for f in fields(self.normalize) for v in getattr(self.normalize, f.name)]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"normalize values must be finite, got {self.normalize}")
        check_image_scale(self.image_scale)
        object.__setattr__(self, "image_scale", float(self.image_scale))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (stored in adapter files). ``image_scale`` is written only when it is
        not 1: files of unscaled adapters stay readable by versions that predate it, and those
        versions refuse (unknown field) exactly the files they would run at the wrong size."""
        norm = self.normalize
        data = {"aux_scale": self.aux_scale, "aux_max": self.aux_max,
                "normalize": {f.name: list(getattr(norm, f.name)) for f in fields(norm)}}
        if self.image_scale != 1:
            data["image_scale"] = self.image_scale
        return data

    def transform_settings(self) -> dict[str, Any]:
        """The ``transforms`` settings that give a model these inputs (mean/std, image scale):
        ``gopt eval``'s defaults for the adapter's dataset."""
        norm = self.normalize
        return {"normalize": {f.name: getattr(norm, f.name) for f in fields(norm)}, "image_scale": self.image_scale}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Preprocessing":
        """Inverse of :meth:`to_dict`; raises ``ValueError`` naming unknown or invalid fields."""
        if not isinstance(data, Mapping):
            raise ValueError(f"preprocessing must be a JSON object, got {type(data).__name__}")
        unknown = sorted(set(data) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"unknown preprocessing fields {unknown}")
        normalize = data.get("normalize", {})
        if not isinstance(normalize, Mapping):
            raise ValueError(f"preprocessing normalize must be a JSON object, got {type(normalize).__name__}")
        unknown = sorted(set(normalize) - {f.name for f in fields(NormalizeConfig)})
        if unknown:
            raise ValueError(f"unknown normalize fields {unknown}")
        try:
            norm = NormalizeConfig(**{k: tuple(v) for k, v in normalize.items()})
        except TypeError as exc:  # a number where a list belongs
            raise ValueError(f"invalid normalize values ({exc})") from None
        return cls(aux_scale=data.get("aux_scale", "fixed"), aux_max=data.get("aux_max"), normalize=norm,
                   image_scale=data.get("image_scale", 1.0))

    def override(self, aux_scale: str | None = None, aux_max: float | None = None,
                 **normalize: tuple[float, ...] | None) -> "Preprocessing":
        """A copy with the given (non-``None``) values replaced, e.g. from command-line flags.

        Switching to ``"per_image"`` drops a stored ``aux_max``; giving ``aux_max`` with
        ``"per_image"`` is an error.
        """
        changes: dict[str, Any] = {}
        if aux_scale is not None:
            changes["aux_scale"] = aux_scale
            if aux_scale != "fixed" and aux_max is None:
                changes["aux_max"] = None
        if aux_max is not None:
            changes["aux_max"] = aux_max
        norm = {k: v for k, v in normalize.items() if v is not None}
        if norm:
            changes["normalize"] = replace(self.normalize, **norm)
        return replace(self, **changes)

    def describe(self) -> str:
        """One line, e.g. ``aux fixed / 10000; rgb mean (...) std (...); aux mean (0.5,) std (0.5,)``."""
        scale = ("fixed / dtype max" if self.aux_max is None else f"fixed / {self.aux_max:g}") \
            if self.aux_scale == "fixed" else "per_image min-max"
        norm = self.normalize
        resize = f"; inputs resized by {self.image_scale:g}" if self.image_scale != 1 else ""
        return (f"aux {scale}; rgb mean {norm.rgb_mean} std {norm.rgb_std}; "
                f"aux mean {norm.aux_mean} std {norm.aux_std}{resize}")


# Reader attribute holding the aux scaling, and the attribute holding its fixed divisor (if any).
_READER_SCALING = (("depth_normalization", "depth_max_mm"), ("thermal_normalization", None),
                   ("sar_normalization", None), ("aux_normalization", "aux_max"))


def dataset_preprocessing(dataset: Any, normalize: NormalizeConfig | None = None) -> Preprocessing:
    """The :class:`Preprocessing` that turns raw files into what ``dataset`` yields.

    The aux scaling comes from the reader's options (``depth_normalization`` with
    ``depth_max_mm`` for NYUDv2 / SUN RGB-D depth, ``thermal_normalization`` for MFNet and
    PST900, ``sar_normalization`` for WHU-OPT-SAR, ``aux_normalization`` with ``aux_max`` for
    the folder reader; HHA and the synthetic world: fixed by the
    dtype maximum). The mean/std is ``normalize`` or else that of the one ``Normalize`` step
    in ``dataset.transform`` (no transform: identity), the image scale that of its
    :class:`~gopt_adapter.preprocessing.ScaleImage` step (none: 1), so what is recorded is what
    the transform applies. RGB scaling is not recorded: ``gopt predict`` divides RGB by its
    dtype maximum, as the readers do by default. Raises ``ValueError`` when it cannot tell.
    """
    aux_scale, aux_max = "fixed", None
    if getattr(dataset, "aux", None) != "hha":
        for scale_attr, max_attr in _READER_SCALING:
            if hasattr(dataset, scale_attr):
                aux_scale = getattr(dataset, scale_attr)
                if aux_scale == "fixed" and max_attr is not None:
                    aux_max = getattr(dataset, max_attr)
                break
    transform = getattr(dataset, "transform", None)
    if normalize is None:
        normalize = _transform_normalize(transform)
    preprocessing = Preprocessing(aux_scale, aux_max, normalize, _transform_image_scale(transform))
    check_aux_channels(normalize, int(getattr(dataset, "aux_channels", 1)))
    return preprocessing


def _transform_image_scale(transform: Any) -> float:
    """The factor of the one :class:`ScaleImage` step of ``transform`` (none: 1.0)."""
    factors = [step.factor for step in getattr(transform, "transforms", [transform]) if isinstance(step, ScaleImage)]
    if len(factors) > 1:
        raise ValueError(f"cannot tell the image scale of the dataset's transform {transform!r} "
                         f"({len(factors)} ScaleImage steps)")
    return factors[0] if factors else 1.0


def _transform_normalize(transform: Any) -> NormalizeConfig:
    if transform is None:
        return _NO_NORMALIZE
    found = [step.config for step in getattr(transform, "transforms", [transform]) if isinstance(step, Normalize)]
    if len(found) != 1:
        raise ValueError(f"cannot tell the normalisation of the dataset's transform {transform!r} "
                         f"({len(found)} Normalize steps); pass normalize= explicitly")
    return found[0]
