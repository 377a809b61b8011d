"""Your own RGB-X data in a plain folder layout (``--dataset folder --root DIR``).

::

    DIR/classes.txt                          one class name per line; line i is label value i
    DIR/<split>/rgb/<stem>.{png,jpg,jpeg,tif,tiff}
    DIR/<split>/aux/<stem>.{png,tif,tiff,npy}      8/16-bit or float; [H,W] or [H,W,C]
    DIR/<split>/label/<stem>.png             8-bit class ids; 255 = ignore

Splits are the sub-folders of ``DIR``. Every file of a split is checked when the dataset is
built, before any training: every RGB stem has its aux and label file (and no aux or label
file lacks its RGB image), the three have one size, every label value is a class id or 255,
and every aux image has the same channel count, which becomes :attr:`aux_channels`. The
first problem found raises ``FileNotFoundError`` / ``ValueError`` naming the file.

Aux scaling to [0, 1] (stored in the adapter's preprocessing, so ``gopt predict`` repeats
it): ``aux_normalization="per_image"`` (default) min-max scales each image, which needs no
knowledge of the sensor's range and so works alike for 16-bit millimetre depth, 8-bit
thermal and float data; ``"fixed"`` divides by ``aux_max`` (default: the dtype maximum, 255
or 65535; required for float data) and clips, keeping values comparable across images, e.g.
``aux_max=10000`` for depth in millimetres up to 10 m.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from ..errors import ImageReadError, ImageSizeMismatchError
from ..preprocessing import AUX_NORMALIZATIONS, AuxNormalization, scale_to_unit
from .base import (
    FileSegDataset,
    SampleFiles,
    Transform,
    check_choice,
    check_image,
    files_by_stem,
    label_mapping,
    map_labels,
    read_image,
    require_dir,
    require_file,
)

__all__ = ["FolderDataset", "RGB_SUFFIXES", "AUX_SUFFIXES", "read_class_names"]

RGB_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
AUX_SUFFIXES = (".png", ".tif", ".tiff", ".npy")
MAX_CLASSES = 255  # label value 255 is the ignore value


def read_class_names(path: Path) -> tuple[str, ...]:
    """``classes.txt``: one name per line, line i naming label value i (trailing blank lines ignored)."""
    lines = require_file(path, "class list").read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    names = tuple(line.strip() for line in lines)
    if not names:
        raise ValueError(f"{path}: no class names (one per line; line i names label value i)")
    blank = [i + 1 for i, name in enumerate(names) if not name]
    if blank:
        raise ValueError(f"{path}: line {blank[0]} is blank; line i names label value i, so every line needs a name")
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"{path}: class names appear twice: {twice}")
    if len(names) > MAX_CLASSES:
        raise ValueError(f"{path}: {len(names)} classes; at most {MAX_CLASSES} (label value 255 means ignore)")
    return names


def _header(path: Path) -> tuple[int, int, int]:
    """``(H, W, channels)`` of an image or ``.npy`` file without decoding its pixels."""
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            shape = np.load(path, mmap_mode="r", allow_pickle=False).shape
            if len(shape) not in (2, 3):
                raise ValueError(f"{path}: expected an [H, W] or [H, W, C] array, found shape {shape}")
            return shape[0], shape[1], shape[2] if len(shape) == 3 else 1
        if suffix in (".tif", ".tiff"):
            with tifffile.TiffFile(path) as tif:
                series = tif.series[0]
                shape, axes = series.shape, series.axes
            if len(shape) == 3 and not axes.endswith("S") and axes.endswith("YX"):  # planar, as read_image reads it
                return shape[1], shape[2], shape[0]
            return shape[0], shape[1], shape[2] if len(shape) == 3 else 1
        with Image.open(path) as im:
            return im.size[1], im.size[0], len(im.getbands())
    except (UnidentifiedImageError, tifffile.TiffFileError, OSError, ValueError) as exc:
        if isinstance(exc, ValueError) and str(path) in str(exc):
            raise
        raise ImageReadError(f"cannot decode {path}: {exc}") from None


class FolderDataset(FileSegDataset):
    """A user's dataset in the folder layout above.

    Args:
        root: the dataset folder (holding ``classes.txt`` and one folder per split).
        split: a sub-folder of ``root`` (``gopt train`` defaults: ``train`` and ``val``).
        aux_normalization: ``"per_image"`` (default) or ``"fixed"``; see the module docstring.
        aux_max: divisor of ``"fixed"`` (``None``: the dtype maximum).
        transform: joint transform applied to each sample.

    Attributes set from the files: ``class_names``, ``aux_channels`` and ``common_size``
    (``(H, W)`` when every image of the split has that size, else ``None``).
    """

    name = "folder"

    def __init__(self, root: str | Path, split: str = "train", *,
                 aux_normalization: AuxNormalization = "per_image", aux_max: float | None = None,
                 transform: Transform | None = None) -> None:
        check_choice("aux_normalization", aux_normalization, AUX_NORMALIZATIONS)
        if aux_max is not None:
            if isinstance(aux_max, bool) or not isinstance(aux_max, (int, float)) or not aux_max > 0:
                raise ValueError(f"aux_max must be a number > 0 or None, got {aux_max!r}")
            if aux_normalization != "fixed":
                raise ValueError(f"aux_max={aux_max} needs aux_normalization='fixed'")
        self.aux_normalization, self.aux_max = aux_normalization, None if aux_max is None else float(aux_max)
        root = require_dir(Path(root).expanduser(), "dataset folder")
        self.class_names = read_class_names(root / "classes.txt")
        super().__init__(root, split, transform)
        self.aux_channels, self.common_size = self._check_files()

    # ---- layout ------------------------------------------------------------------------
    def _label_mapping(self) -> dict[int, int]:
        return label_mapping(self.num_classes)

    def _list_samples(self) -> list[SampleFiles]:
        split_dir = self.root / self.split
        if not split_dir.is_dir():
            present = sorted(p.name for p in self.root.iterdir() if p.is_dir())
            raise FileNotFoundError(f"split folder not found: {split_dir} (splits in {self.root}: "
                                    f"{', '.join(present) or 'none'})")
        dirs = {kind: require_dir(split_dir / kind, f"{kind} folder") for kind in ("rgb", "aux", "label")}
        rgb = files_by_stem(dirs["rgb"], RGB_SUFFIXES)
        aux, label = files_by_stem(dirs["aux"], AUX_SUFFIXES), files_by_stem(dirs["label"], (".png",))
        for kind, files in (("aux", aux), ("label", label)):
            orphans = sorted(set(files) - set(rgb))
            if orphans:
                raise FileNotFoundError(f"RGB image not found for {files[orphans[0]]}: expected "
                                        f"{dirs['rgb'] / orphans[0]}{{{','.join(RGB_SUFFIXES)}}}")
        for kind, files, suffixes in (("aux", aux, AUX_SUFFIXES), ("label", label, (".png",))):
            lacking = [stem for stem in rgb if stem not in files]
            if lacking:  # the same message the readers' find_image gives
                raise FileNotFoundError(f"{kind} image not found: {dirs[kind] / (lacking[0] + suffixes[0])}")
        return [SampleFiles(stem, path, aux[stem], label[stem]) for stem, path in rgb.items()]

    def _check_files(self) -> tuple[int, tuple[int, int] | None]:
        """Checks every sample (see the module docstring); returns the aux channel count and the
        common size of the split (``None`` when sizes vary)."""
        channels: tuple[int, Path] | None = None
        sizes = set()
        for files in self.samples:
            h, w, c = _header(files.rgb)
            if c not in (3, 4):
                raise ValueError(f"RGB image {files.rgb}: expected 3 channels, found {c}")
            ah, aw, ac = _header(files.aux)
            if channels is None:
                channels = (ac, files.aux)
            elif ac != channels[0]:
                raise ValueError(f"aux image {files.aux} has {ac} channel(s) but {channels[1]} has {channels[0]}: "
                                 "every aux image must have the same channel count")
            raw = read_image(files.label)
            if raw.dtype != np.uint8:
                raise ValueError(f"label {files.label}: expected 8-bit class ids, found {raw.dtype.name}")
            listing = f"{files.rgb}: {h}x{w}; {files.aux}: {ah}x{aw}; {files.label}: {raw.shape[0]}x{raw.shape[1]}"
            if not (h, w) == (ah, aw) == raw.shape[:2]:
                raise ImageSizeMismatchError(f"modalities of one sample differ in size (HxW): {listing}")
            map_labels(raw, self._lut, files.label)  # names the file and the values that are no class id
            sizes.add((h, w))
        assert channels is not None  # FileSegDataset refuses an empty split
        return channels[0], (sizes.pop() if len(sizes) == 1 else None)

    # ---- reading -----------------------------------------------------------------------
    def _read_rgb(self, path: Path) -> np.ndarray:
        arr = read_image(path)
        if arr.ndim == 3 and arr.shape[2] == 4:
            arr = arr[:, :, :3]  # alpha
        arr = check_image(arr, path, "RGB image", 3, (np.uint8, np.uint16))
        return scale_to_unit(arr, "fixed", None, path)  # [H, W, 3]

    def _read_aux(self, path: Path) -> np.ndarray:
        arr = np.load(path, allow_pickle=False) if path.suffix.lower() == ".npy" else read_image(path)
        arr = check_image(arr, path, "aux image", self.aux_channels)
        if arr.dtype.kind == "f":
            arr = np.where(np.isfinite(arr), arr, 0)  # NaN / inf: no reading
        return scale_to_unit(arr, self.aux_normalization, self.aux_max, path)  # [H, W, C]
