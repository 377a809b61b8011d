"""How raw image files become the tensors an adapter was trained on, stored with the adapter.

A model trained on NYUDv2 saw millimetre depth divided by 10000 and normalised with ImageNet
statistics; running it on a depth PNG divided by 65535 silently gives poor predictions. A
:class:`Preprocessing` records both steps so that ``gopt predict`` can repeat them:

1. the auxiliary image to [0, 1]: ``"fixed"`` divides by ``aux_max`` (``None``: the file
   dtype's maximum, 255 or 65535) and clips, ``"per_image"`` min-max scales each image;
2. per-modality mean/std (a :class:`~gopt_adapter.transforms.NormalizeConfig`);
3. the fixed resize factor of the inputs (``transforms.image_scale``; predictions are resized
   back to the input's full size).

RGB is always divided by its dtype maximum, as every reader does.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Mapping

from .scaling import AUX_NORMALIZATIONS
from .transforms import Normalize, NormalizeConfig, ScaleImage, check_image_scale

__all__ = ["Preprocessing", "check_aux_channels", "dataset_preprocessing"]


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
    :class:`~gopt_adapter.transforms.ScaleImage` step (none: 1), so what is recorded is what
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
