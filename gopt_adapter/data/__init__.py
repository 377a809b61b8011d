"""RGB-X segmentation datasets: your own folder or CMX / DFormer layout, readers of the five benchmark
layouts and a synthetic world.

All datasets return the same sample dict (see :mod:`gopt_adapter.data.base`): ``rgb``
float ``[3, H, W]`` in [0, 1], ``aux`` float ``[C_aux, H, W]`` in [0, 1], ``label`` int64
``[H, W]`` with ignore value 255, and ``meta`` (``stem``, original ``size``). Use
:func:`get_dataset` to build one by name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..labels import IGNORE_INDEX
from .base import FileSegDataset, SegDataset, read_image
from .folder import FolderDataset
from .mfnet import MFNET_CLASSES, MFNet
from .nyudv2 import NYUDV2_CLASSES, NYUDv2
from .pst900 import PST900_CLASSES, PST900
from .rgbx import RGBXDataset
from .sunrgbd import SUNRGBD_CLASSES, SUNRGBD
from .synthetic import (
    FAMILIES,
    WORLDS,
    RelativeSensor,
    SyntheticClass,
    SyntheticRGBX,
    rgb_only_miou_bound,
    world_family,
)
from .whu_opt_sar import WHU_OPT_SAR_CLASSES, WHUOptSar, tile_whu_opt_sar

__all__ = [
    "DATASETS",
    "get_dataset",
    "IGNORE_INDEX",
    "SegDataset",
    "FileSegDataset",
    "read_image",
    "FolderDataset",
    "RGBXDataset",
    "NYUDv2",
    "SUNRGBD",
    "MFNet",
    "PST900",
    "WHUOptSar",
    "SyntheticRGBX",
    "SyntheticClass",
    "RelativeSensor",
    "WORLDS",
    "FAMILIES",
    "world_family",
    "rgb_only_miou_bound",
    "tile_whu_opt_sar",
    "NYUDV2_CLASSES",
    "SUNRGBD_CLASSES",
    "MFNET_CLASSES",
    "PST900_CLASSES",
    "WHU_OPT_SAR_CLASSES",
]

#: Registry of dataset names (as used by the benchmarks and the command line) to classes.
DATASETS: dict[str, type[SegDataset]] = {
    "folder": FolderDataset,
    "rgbx": RGBXDataset,
    "nyudv2": NYUDv2,
    "sunrgbd": SUNRGBD,
    "mfnet": MFNet,
    "pst900": PST900,
    "whu_opt_sar": WHUOptSar,
    "synthetic": SyntheticRGBX,
}


def get_dataset(name: str, root: str | Path | None = None, split: str = "train", **options: Any) -> SegDataset:
    """Build a dataset by registry name.

    Args:
        name: one of :data:`DATASETS` (case-insensitive; ``-`` is read as ``_``).
        root: the dataset folder; required for every name but ``"synthetic"``, which
            ignores it.
        split: the split to read (each class documents its split names).
        **options: keyword arguments of the dataset class (e.g. ``aux_normalization="fixed",
            aux_max=10000`` for a folder, ``modality="HHA", reduce_zero_label=True`` for the
            CMX / DFormer layout, ``aux="hha"`` for NYUDv2,
            ``count_unlabeled=False`` for MFNet, ``mode="thermal", size=128, length=512,
            seed=0`` for the synthetic world, ``transform=...`` for all).
    """
    key = name.lower().replace("-", "_")
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; available: {sorted(DATASETS)}")
    cls = DATASETS[key]
    if cls is SyntheticRGBX:
        return SyntheticRGBX(split=split, **options)
    if root is None:
        raise ValueError(f"dataset {name!r} needs root= (the folder of your copy of it)")
    return cls(root, split, **options)
