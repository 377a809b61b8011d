"""PST900 (RGB-thermal subterranean scenes, 720x1280, 5 classes incl. background).

Layout under ``root`` (the ``PST900_RGBT_Dataset`` folder, or its parent)::

    {train,test}/rgb/<stem>.png       3-channel uint8
    {train,test}/thermal/<stem>.png   1-channel 8-bit (0 marks holes)
    {train,test}/labels/<stem>.png    uint8 0..4
    (also depth/ and thermal_raw/, not read)

There are no list files: the samples of a split are the sorted stems of ``rgb/``, and the
same stem must exist in ``thermal/`` and ``labels/``. Labels are not shifted; background
(0) is a class and counts in mIoU, as in the official evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from ..preprocessing import AUX_NORMALIZATIONS, AuxNormalization
from .base import (
    FileSegDataset,
    SampleFiles,
    Transform,
    check_choice,
    find_sample_files,
    label_mapping,
    read_aux_image,
    require_dir,
    resolve_root,
)

__all__ = ["PST900", "PST900_CLASSES"]

PST900_CLASSES: tuple[str, ...] = ("background", "fire_extinguisher", "backpack", "hand_drill", "survivor")


class PST900(FileSegDataset):
    """PST900 reader.

    Args:
        root: the ``PST900_RGBT_Dataset`` folder (or a folder containing it).
        split: ``"train"`` or ``"test"`` (sizes differ between copies; counted on disk).
        thermal_normalization: ``"fixed"`` (default: divide by the dtype maximum, holes
            stay 0) or ``"per_image"``.
        transform: joint transform applied to each sample.

    ``rgb`` in [0, 1]; ``aux`` = thermal, 1 channel in [0, 1].
    """

    name = "pst900"
    dataset_folder = "PST900_RGBT_Dataset"
    class_names = PST900_CLASSES
    aux_channels = 1
    splits = ("train", "test")

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        thermal_normalization: AuxNormalization = "fixed",
        transform: Transform | None = None,
    ) -> None:
        check_choice("thermal_normalization", thermal_normalization, AUX_NORMALIZATIONS)
        self.thermal_normalization = thermal_normalization
        super().__init__(resolve_root(root, self.dataset_folder), split, transform)

    def _label_mapping(self) -> Mapping[int, int]:
        return label_mapping(self.num_classes)

    def _list_samples(self) -> list[SampleFiles]:
        split_dir = require_dir(self.root / self.split, "PST900 split folder")
        rgb_dir = require_dir(split_dir / "rgb", "RGB folder")
        thermal_dir = require_dir(split_dir / "thermal", "thermal folder")
        label_dir = require_dir(split_dir / "labels", "label folder")
        stems = sorted(p.stem for p in rgb_dir.iterdir() if p.suffix.lower() in (".png", ".jpg"))
        return [find_sample_files(stem, rgb_dir, thermal_dir, label_dir, aux_what="thermal image") for stem in stems]

    def _read_aux(self, path: Path) -> np.ndarray:
        return read_aux_image(path, "thermal image", 1, (np.uint8, np.uint16), self.thermal_normalization)  # [H, W, 1]
