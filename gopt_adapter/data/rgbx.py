"""Your own RGB-X data in the CMX / DFormer layout (``--dataset rgbx --root DIR``).

::

    DIR/classes.txt                  one class name per line; line i names class id i
    DIR/RGB/<name>.{png,jpg,jpeg,tif,tiff}
    DIR/<modality>/<name>.{png,jpg,jpeg,tif,tiff,npy}   Depth/, HHA/, Thermal/, Modal/: any name
    DIR/Label/<name>.png             8-bit class ids (with reduce_zero_label: 0 = unlabeled, k = class k-1)
    DIR/train.txt, DIR/test.txt      the split's names, one per line

The layout of CMX's and DFormer's ``RGBXDataset``, with the ``classes.txt`` of the folder
layout added. A split is the list file ``<split>.txt``; its lines name a sample by its stem
(``0001``, CMX), its file name (``0001.jpg``) or its path (``RGB/0001.jpg``, DFormer; only the
first word of a line is read, so ``RGB/0001.jpg Label/0001.png`` works too): the stem is what
is looked up in the three folders. ``modality`` names the X folder; left out, it is the one
folder of ``DIR`` beside ``RGB/`` and ``Label/``.

``reduce_zero_label`` (mmseg's name for CMX's ``transform_gt``, off by default as in mmseg)
reads raw 0 as ignore and raw k as class k - 1, for labels that keep 0 for "unlabeled"
(NYUDv2 and SUN RGB-D as CMX / DFormer store them). Raw 255 is ignore either way.

Every file of the split is checked up front with the folder reader's checks (sizes, channel
counts, 8-bit labels, label values), and the aux scaling is the folder reader's, with the
same ``aux_normalization`` / ``aux_max`` options.
"""

from __future__ import annotations

from pathlib import Path

from ..preprocessing import AuxNormalization
from .base import SampleFiles, Transform, find_sample_files, label_mapping, read_list_file, require_dir
from .folder import AUX_SUFFIXES, RGB_SUFFIXES, FolderDataset

__all__ = ["RGBXDataset", "RGBX_AUX_SUFFIXES"]

RGB_FOLDER, LABEL_FOLDER = "RGB", "Label"
RGBX_AUX_SUFFIXES = AUX_SUFFIXES + (".jpg", ".jpeg")  # HHA images are JPEGs in CMX's copies


class RGBXDataset(FolderDataset):
    """A dataset in the CMX / DFormer layout above.

    Args:
        root: the dataset folder (``RGB/``, the modality folder, ``Label/``, split lists, ``classes.txt``).
        split: the stem of a list file in ``root`` (``"train"``, ``"test"``).
        modality: the X folder's name (``"Depth"``, ``"HHA"``, ``"Thermal"``, ...); ``None``
            (default): the only folder of ``root`` other than ``RGB`` and ``Label``.
        reduce_zero_label: raw 0 -> ignore (255), raw k -> k - 1; default ``False``.
        aux_normalization, aux_max: as :class:`~gopt_adapter.data.folder.FolderDataset`.
        transform: joint transform applied to each sample.

    Attributes set from the files: ``class_names``, ``modality``, ``aux_channels`` and ``common_size``.
    """

    name = "rgbx"

    def __init__(self, root: str | Path, split: str = "train", *, modality: str | None = None,
                 reduce_zero_label: bool = False, aux_normalization: AuxNormalization = "per_image",
                 aux_max: float | None = None, transform: Transform | None = None) -> None:
        if modality is not None and not (isinstance(modality, str) and modality.strip()):
            raise ValueError(f"modality must name the X folder (e.g. 'Depth') or be None, got {modality!r}")
        if not isinstance(reduce_zero_label, bool):
            raise ValueError(f"reduce_zero_label must be true or false, got {reduce_zero_label!r}")
        self.modality, self.reduce_zero_label = modality, reduce_zero_label
        super().__init__(root, split, aux_normalization=aux_normalization, aux_max=aux_max, transform=transform)

    def _label_mapping(self) -> dict[int, int]:
        return label_mapping(self.num_classes, self.reduce_zero_label)

    def _find_modality(self) -> str:
        """The one folder of ``root`` beside ``RGB/`` and ``Label/`` (hidden ones aside)."""
        found = sorted(p.name for p in self.root.iterdir()
                       if p.is_dir() and p.name not in (RGB_FOLDER, LABEL_FOLDER) and not p.name.startswith("."))
        if not found:
            raise FileNotFoundError(f"modality folder not found: {self.root} holds no folder beside "
                                    f"{RGB_FOLDER}/ and {LABEL_FOLDER}/ (e.g. Depth/, Thermal/)")
        if len(found) > 1:
            raise ValueError(f"{self.root} holds {len(found)} modality folders ({', '.join(found)}): name one with "
                             "modality= (gopt train: --set dataset_options.modality=NAME)")
        return found[0]

    def _list_samples(self) -> list[SampleFiles]:
        if self.modality is None:
            self.modality = self._find_modality()
        rgb_dir = require_dir(self.root / RGB_FOLDER, "RGB folder")
        aux_dir = require_dir(self.root / self.modality, "modality folder")
        label_dir = require_dir(self.root / LABEL_FOLDER, "label folder")
        list_file = self.root / f"{self.split}.txt"
        samples = []
        for name in read_list_file(list_file):
            try:
                samples.append(find_sample_files(name, rgb_dir, aux_dir, label_dir, rgb_suffixes=RGB_SUFFIXES,
                                                 aux_suffixes=RGBX_AUX_SUFFIXES, aux_what=f"{self.modality} image"))
            except FileNotFoundError as exc:  # which line of which list asks for the file
                raise FileNotFoundError(f"{list_file} lists {name!r}, but {exc}") from None
        return samples
