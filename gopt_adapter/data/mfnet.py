"""MFNet (RGB-thermal urban scenes, 480x640, 8 classes + "unlabeled").

Two layouts are read (``layout="auto"`` picks the one present under ``root``):

* ``"official"``: ``images/<stem>.png`` is ONE 4-channel uint8 PNG (R, G, B, thermal),
  ``labels/<stem>.png`` uint8 0..8, list files ``train.txt``, ``val.txt``, ``test.txt``
  (optional ``test_day.txt``, ``test_night.txt``) of stems without extension;
* ``"folders"``: ``RGB/<stem>.png`` (3 channels), ``Thermal/<stem>.png`` (1 channel),
  ``Label/<stem>.png``, list files ``train_val.txt``, ``test.txt``.

``split`` names a list file (``<split>.txt``). Labels are not shifted. Stems end in ``D``
(day) or ``N`` (night).
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
    find_image,
    find_sample_files,
    label_mapping,
    read_aux_image,
    read_image,
    read_list_file,
    require_dir,
)

__all__ = ["MFNet", "MFNET_CLASSES"]

MFNET_CLASSES: tuple[str, ...] = (
    "unlabeled", "car", "person", "bike", "curve", "car_stop", "guardrail", "color_cone", "bump",
)


class MFNet(FileSegDataset):
    """MFNet reader.

    Args:
        root: the MFNet folder.
        split: a list file stem: ``"train"``, ``"val"``, ``"test"``, ``"test_day"``,
            ``"test_night"`` (official layout) or ``"train_val"``, ``"test"`` (folders).
        layout: ``"auto"`` (default), ``"official"`` or ``"folders"``.
        count_unlabeled: ``True`` (default, common practice) keeps raw 0 "unlabeled" as
            class 0 of 9, evaluated in mIoU; ``False`` maps it to 255 and shifts the 8 real
            classes to 0..7.
        thermal_normalization: ``"fixed"`` (default: divide by the dtype maximum, 255 for
            the uint8 thermal channel) or ``"per_image"`` (min-max per image).
        transform: joint transform applied to each sample.

    ``rgb`` in [0, 1]; ``aux`` = thermal, 1 channel in [0, 1].
    """

    name = "mfnet"
    aux_channels = 1
    expected_sizes = {"train": 784, "val": 392, "test": 393}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        layout: Literal["auto", "official", "folders"] = "auto",
        count_unlabeled: bool = True,
        thermal_normalization: AuxNormalization = "fixed",
        transform: Transform | None = None,
    ) -> None:
        check_choice("layout", layout, ("auto", "official", "folders"))
        check_choice("thermal_normalization", thermal_normalization, AUX_NORMALIZATIONS)
        self.count_unlabeled = bool(count_unlabeled)
        self.class_names = MFNET_CLASSES if self.count_unlabeled else MFNET_CLASSES[1:]
        self.thermal_normalization = thermal_normalization
        root_path = Path(root).expanduser()
        if layout == "auto":
            layout = "folders" if (root_path / "Thermal").is_dir() else "official"
        self.layout = layout
        super().__init__(root_path, split, transform)

    @staticmethod
    def subset_of(stem: str) -> str | None:
        """``"day"`` or ``"night"`` from the stem's last letter (MFNet names ``00101D``,
        ``00701N``), ``None`` for any other stem: the two halves MFNet results are reported on."""
        return {"D": "day", "N": "night"}.get(stem[-1:].upper())

    def _label_mapping(self) -> Mapping[int, int]:
        return label_mapping(self.num_classes, reduce_zero_label=not self.count_unlabeled)

    def _list_samples(self) -> list[SampleFiles]:
        stems = read_list_file(self.root / f"{self.split}.txt")
        if self.layout == "official":
            image_dir = require_dir(self.root / "images", "MFNet images folder")
            label_dir = require_dir(self.root / "labels", "MFNet labels folder")
            samples = []
            for stem in stems:
                image = find_image(image_dir, stem, (".png",), "RGB-T image")
                samples.append(SampleFiles(stem, image, image, find_image(label_dir, stem, (".png",), "label image")))
            return samples
        rgb_dir = require_dir(self.root / "RGB", "RGB folder")
        thermal_dir = require_dir(self.root / "Thermal", "Thermal folder")
        label_dir = require_dir(self.root / "Label", "label folder")
        return [
            find_sample_files(stem, rgb_dir, thermal_dir, label_dir, aux_suffixes=(".png", ".jpg"),
                              aux_what="thermal image")
            for stem in stems
        ]

    def _read_aux(self, path: Path) -> np.ndarray:
        return read_aux_image(path, "thermal image", 1, (np.uint8, np.uint16), self.thermal_normalization)  # [H, W, 1]

    def _read_modalities(self, files: SampleFiles) -> tuple[np.ndarray, np.ndarray]:
        if self.layout == "folders":
            return super()._read_modalities(files)  # separate files: their sizes are checked there
        # One 4-channel array: RGB and thermal cannot differ in size (the label is checked in load).
        rgbt = check_image(read_image(files.rgb), files.rgb, "MFNet RGB-T image", 4, (np.uint8,))
        rgb = rgbt[:, :, :3].astype(np.float32) * np.float32(1.0 / 255.0)  # [H, W, 3]
        thermal = scale_to_unit(rgbt[:, :, 3:], self.thermal_normalization, None, files.rgb)  # [H, W, 1]
        return rgb, thermal
