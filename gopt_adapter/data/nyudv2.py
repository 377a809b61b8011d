"""NYUDv2 (RGB-D indoor scenes, 40 classes), CMX / DFormer layout.

Layout under ``root`` (the ``NYUDepthv2`` folder, or its parent)::

    RGB/<stem>.jpg        3-channel uint8
    Depth/<stem>.png      1-channel uint8 (per-image normalised copies) or uint16 (mm)
    HHA/<stem>.jpg        3-channel uint8 (only for ``aux="hha"``)
    Label/<stem>.png      uint8, 0 = unlabeled, 1..40 = classes
    train.txt, test.txt   one stem or ``RGB/<stem>.jpg`` per line

Labels are shifted by one: raw 0 -> 255 (ignore), raw k -> k - 1, so classes are 0..39.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Mapping

import numpy as np

from ..preprocessing import AUX_NORMALIZATIONS, AuxNormalization, scale_to_unit
from .base import (
    FileSegDataset,
    SampleFiles,
    Transform,
    check_choice,
    check_image,
    find_sample_files,
    label_mapping,
    read_image,
    read_list_file,
    require_dir,
    resolve_root,
)

__all__ = ["NYUDv2", "NYUDV2_CLASSES"]

NYUDV2_CLASSES: tuple[str, ...] = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window",
    "bookshelf", "picture", "counter", "blinds", "desk", "shelves", "curtain", "dresser",
    "pillow", "mirror", "floor mat", "clothes", "ceiling", "books", "refrigerator",
    "television", "paper", "towel", "shower curtain", "box", "whiteboard", "person",
    "night stand", "toilet", "sink", "lamp", "bathtub", "bag", "otherstructure",
    "otherfurniture", "otherprop",
)


class NYUDv2(FileSegDataset):
    """NYUDv2 reader (also the base of :class:`~gopt_adapter.data.sunrgbd.SUNRGBD`).

    Args:
        root: the ``NYUDepthv2`` folder (or a folder containing it).
        split: ``"train"`` (795) or ``"test"`` (654).
        aux: ``"depth"`` (default; 1 channel) or ``"hha"`` (3 channels from ``HHA/``).
        depth_normalization: ``"fixed"`` (default) divides uint8 depth by 255 and uint16
            depth (millimetres) by ``depth_max_mm``, clipped to [0, 1]; ``"per_image"``
            min-max scales each depth map. 0 (no reading) stays 0 under ``"fixed"``.
        depth_max_mm: range used for uint16 depth under ``"fixed"`` (default 10 m).
        transform: joint transform applied to each sample.

    ``rgb`` is in [0, 1]; ``aux`` is depth in [0, 1] (or HHA / 255).
    """

    name = "nyudv2"
    dataset_folder = "NYUDepthv2"
    label_folder = "Label"
    class_names = NYUDV2_CLASSES
    splits = ("train", "test")
    expected_sizes = {"train": 795, "test": 654}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        aux: Literal["depth", "hha"] = "depth",
        depth_normalization: AuxNormalization = "fixed",
        depth_max_mm: float = 10_000.0,
        transform: Transform | None = None,
    ) -> None:
        check_choice("aux", aux, ("depth", "hha"))
        check_choice("depth_normalization", depth_normalization, AUX_NORMALIZATIONS)
        if not depth_max_mm > 0:
            raise ValueError(f"depth_max_mm must be > 0, got {depth_max_mm}")
        self.aux = aux
        self.aux_channels = 3 if aux == "hha" else 1
        self.depth_normalization = depth_normalization
        self.depth_max_mm = float(depth_max_mm)
        super().__init__(resolve_root(root, self.dataset_folder), split, transform)

    def _label_mapping(self) -> Mapping[int, int]:
        return label_mapping(self.num_classes, reduce_zero_label=True)  # raw 0 = unlabeled

    def _list_samples(self) -> list[SampleFiles]:
        rgb_dir = require_dir(self.root / "RGB", "RGB folder")
        aux_dir = require_dir(self.root / ("HHA" if self.aux == "hha" else "Depth"), f"{self.aux} folder")
        label_dir = require_dir(self.root / self.label_folder, "label folder")
        aux_suffixes = (".jpg", ".png") if self.aux == "hha" else (".png",)
        return [
            find_sample_files(stem, rgb_dir, aux_dir, label_dir, rgb_suffixes=(".jpg", ".png"),
                              aux_suffixes=aux_suffixes, aux_what=f"{self.aux} image")
            for stem in read_list_file(self.root / f"{self.split}.txt")
        ]

    def _read_aux(self, path: Path) -> np.ndarray:
        if self.aux == "hha":
            hha = check_image(read_image(path), path, "HHA image", 3, (np.uint8,))
            return hha.astype(np.float32) * np.float32(1.0 / 255.0)  # [H, W, 3]
        depth = check_image(read_image(path), path, "depth image", 1, (np.uint8, np.uint16))
        max_value = 255.0 if depth.dtype == np.uint8 else self.depth_max_mm
        return scale_to_unit(depth, self.depth_normalization, max_value, path)  # [H, W, 1]
