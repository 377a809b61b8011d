"""How an image's raw values become [0, 1]: the vocabulary the readers, the adapter's
:class:`~gopt_adapter.preprocessing.Preprocessing` and ``gopt predict`` share.

A leaf module (numpy only), so that the core can validate a scaling name without loading
the dataset readers, PIL or tifffile.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import numpy as np

__all__ = ["AUX_NORMALIZATIONS", "AuxNormalization", "dtype_max", "scale_to_unit"]

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
