"""Shared reading, validation and sample assembly for the RGB-X segmentation readers.

Every reader in this package returns the same sample dict::

    {
        "rgb":   float32 tensor [3, H, W], values in [0, 1] (not mean/std normalised),
        "aux":   float32 tensor [C_aux, H, W], values in [0, 1] (rule documented per reader),
        "label": int64 tensor [H, W], class ids in [0, num_classes) or ``ignore_index`` (255),
        "meta":  {"stem": str, "size": (H, W)}   # size before any transform
    }

Mean/std normalisation is *not* applied here: it is the last photometric step of the
transforms in :mod:`gopt_adapter.data.transforms`, so that every reader (and the synthetic world)
hands over the same value range.

Error conventions (shared by all readers):

* a missing root folder, list file or image raises :class:`FileNotFoundError` whose message
  contains the missing path;
* a file that exists but is malformed (modalities of different sizes, wrong channel count,
  wrong dtype, label values that are neither a known raw value nor the ignore value) raises
  :class:`ValueError` whose message contains the file path and the offending values.

A reader subclasses :class:`FileSegDataset` and only *declares* its layout
(:meth:`FileSegDataset._list_samples`), its class names, its raw-label mapping
(:meth:`FileSegDataset._label_mapping`) and how its auxiliary modality is read and scaled
(:meth:`FileSegDataset._read_aux`); reading, validation and tensor conversion live here once.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import tifffile
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ..errors import ImageReadError, ImageSizeMismatchError
from ..labels import IGNORE_INDEX
from ..preprocessing import AuxNormalization, dtype_max, scale_to_unit

__all__ = [
    "Transform",
    "SampleFiles",
    "SegDataset",
    "FileSegDataset",
    "read_image",
    "read_list_file",
    "require_dir",
    "require_file",
    "find_image",
    "find_sample_files",
    "files_by_stem",
    "check_image",
    "check_same_size",
    "scale_to_unit",
    "read_aux_image",
    "label_mapping",
    "build_label_lut",
    "map_labels",
    "make_sample",
    "check_choice",
    "dtype_max",
    "resolve_root",
]

logger = logging.getLogger(__name__)

Transform = Callable[[dict[str, Any]], dict[str, Any]]


# --------------------------------------------------------------------------------------
# Files and folders
# --------------------------------------------------------------------------------------
def require_dir(path: Path, what: str) -> Path:
    """Return ``path`` if it is a directory, else raise FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` if it is a file, else raise FileNotFoundError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    return path


def find_image(folder: Path, stem: str, suffixes: Sequence[str], what: str) -> Path:
    """Return ``folder/stem<suffix>`` for the first suffix that exists.

    Public copies differ in extensions (``.jpg`` vs ``.png``); the first suffix is the
    documented one and is the path named in the error when none exists.
    """
    for suffix in suffixes:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{what} not found: {folder / (stem + suffixes[0])}")


def files_by_stem(folder: Path, suffixes: Sequence[str]) -> dict[str, Path]:
    """The files in ``folder`` whose suffix (case-insensitive) is one of ``suffixes``, by stem,
    in name order; two files of one stem (``a.png``, ``a.jpg``) raise ``ValueError`` naming both."""
    found: dict[str, Path] = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and path.suffix.lower() in suffixes:
            if path.stem in found:
                raise ValueError(f"two files with stem {path.stem!r} in {folder}: {found[path.stem].name}, {path.name}")
            found[path.stem] = path
    return found


def read_list_file(path: Path) -> list[str]:
    """Read a split list file and return its stems.

    Accepts one entry per line, either a bare stem (``0001``) or a relative path
    (``RGB/0001.jpg``); only the first whitespace-separated token of a line is used, so
    "image label" pair lines work too. Blank lines and ``#`` comments are skipped.
    """
    path = require_file(path, "split list file")
    stems = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        token = line.split()[0]
        stems.append(Path(token).stem if ("/" in token or "." in Path(token).name) else token)
    return stems


# --------------------------------------------------------------------------------------
# Image decoding
# --------------------------------------------------------------------------------------
def _read_tiff(path: Path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        arr = series.asarray()
        axes = series.axes
    if arr.ndim == 3 and not axes.endswith("S") and axes.endswith("YX"):
        # Band-interleaved (planar) or one page per band: [C, H, W] -> [H, W, C].
        arr = np.moveaxis(arr, 0, -1)
    return np.ascontiguousarray(arr)


def read_image(path: Path) -> np.ndarray:
    """Decode an image file to a numpy array in its stored dtype.

    PNG/JPEG go through pillow, TIFF through tifffile. Returns ``[H, W]`` for single-channel
    images and ``[H, W, C]`` otherwise (multi-band TIFFs are returned band-last whichever
    interleaving they were written with). Palette PNGs return their palette indices, which
    is what label maps stored as palette images mean. 16-bit PNGs come back as uint16.
    """
    path = Path(path)
    require_file(path, "image file")
    if path.suffix.lower() in (".tif", ".tiff"):
        try:
            return _read_tiff(path)
        except (tifffile.TiffFileError, ValueError) as exc:
            raise ImageReadError(f"cannot decode TIFF {path}: {exc}") from exc
    try:
        with Image.open(path) as im:
            mode = im.mode
            arr = np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise ImageReadError(f"cannot decode image {path}: {exc}") from exc
    if mode == "I" and arr.size and arr.min() >= 0 and arr.max() <= np.iinfo(np.uint16).max:
        arr = arr.astype(np.uint16)  # some 16-bit PNGs open as 32-bit "I"
    elif mode == "1":
        arr = arr.astype(np.uint8)
    return arr


# --------------------------------------------------------------------------------------
# Validation and conversion
# --------------------------------------------------------------------------------------
def check_image(
    arr: np.ndarray,
    path: Path,
    what: str,
    channels: int,
    dtypes: Sequence[np.dtype | type] | None = None,
) -> np.ndarray:
    """Validate channel count and dtype; return the array as ``[H, W, C]``.

    ``dtypes=None`` accepts any integer or floating dtype.
    """
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] != channels:
        found = arr.shape[2] if arr.ndim == 3 else f"array of shape {arr.shape}"
        raise ValueError(f"{what} {path}: expected {channels} channel(s), found {found}")
    if dtypes is None:
        ok = arr.dtype.kind in "uif"
        allowed = "integer or float"
    else:
        ok = any(arr.dtype == np.dtype(d) for d in dtypes)
        allowed = ", ".join(np.dtype(d).name for d in dtypes)
    if not ok:
        raise ValueError(f"{what} {path}: expected dtype {allowed}, found {arr.dtype.name}")
    return arr


def check_same_size(items: Sequence[tuple[np.ndarray, Path]]) -> tuple[int, int]:
    """Check that all arrays share the same ``(H, W)``; return it."""
    sizes = {tuple(a.shape[:2]) for a, _ in items}
    if len(sizes) != 1:
        listing = "; ".join(f"{p}: {a.shape[0]}x{a.shape[1]}" for a, p in items)
        raise ImageSizeMismatchError(f"modalities of one sample differ in size (HxW): {listing}")
    return sizes.pop()


def read_aux_image(
    path: Path,
    what: str,
    channels: int,
    dtypes: Sequence[np.dtype | type] | None,
    normalization: AuxNormalization,
    max_value: float | None = None,
) -> np.ndarray:
    """Read, validate and scale an auxiliary image: float32 ``[H, W, channels]`` in [0, 1]."""
    arr = check_image(read_image(path), path, what, channels, dtypes)
    return scale_to_unit(arr, normalization, max_value, path)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not one of {tuple(choices)}")


def label_mapping(num_classes: int, reduce_zero_label: bool = False) -> dict[int, int]:
    """``{raw value: class id}`` of labels that store class ids as they are, or with
    ``reduce_zero_label`` (mmseg's name; CMX's ``transform_gt``) store 0 for "unlabeled" and class
    ``k`` as ``k + 1``: raw 0 -> ignore, raw k -> k - 1. Raw 255 is ignore either way, so a
    shifted label holds at most 254 classes (``ValueError`` beyond)."""
    if reduce_zero_label and num_classes > IGNORE_INDEX - 1:
        raise ValueError(f"{num_classes} classes with reduce_zero_label: at most {IGNORE_INDEX - 1} (raw values "
                         f"1..{IGNORE_INDEX - 1}; {IGNORE_INDEX} means ignore)")
    if reduce_zero_label:
        return {0: IGNORE_INDEX, **{k + 1: k for k in range(num_classes)}}
    return {k: k for k in range(num_classes)}


def build_label_lut(mapping: Mapping[int, int], size: int = 256) -> np.ndarray:
    """A raw-value -> class-id lookup table; -1 marks raw values that are invalid.

    The raw value ``IGNORE_INDEX`` (255) always maps to the ignore value.
    """
    lut = np.full(size, -1, dtype=np.int64)
    for raw, cls in mapping.items():
        lut[raw] = cls
    lut[IGNORE_INDEX] = IGNORE_INDEX
    return lut


def map_labels(raw: np.ndarray, lut: np.ndarray, path: Path) -> np.ndarray:
    """Apply a label lookup table; raise ValueError naming the file and bad raw values."""
    if raw.ndim == 3 and raw.shape[2] == 1:
        raw = raw[:, :, 0]
    if raw.ndim != 2:
        raise ValueError(f"label {path}: expected a single-channel label map, found shape {raw.shape}")
    if raw.dtype.kind not in "ui":
        raise ValueError(f"label {path}: expected an integer dtype, found {raw.dtype.name}")
    if raw.size and int(raw.max()) >= lut.size:
        bad = np.unique(raw[raw >= lut.size])
        _raise_bad_labels(path, bad, lut)
    mapped = lut[raw]  # [H, W] int64
    invalid = mapped < 0
    if invalid.any():
        _raise_bad_labels(path, np.unique(raw[invalid]), lut)
    return mapped


def _raise_bad_labels(path: Path, bad: np.ndarray, lut: np.ndarray) -> None:
    valid = np.flatnonzero(lut >= 0).tolist()
    shown = bad[:20].tolist()
    more = f" (+{bad.size - 20} more)" if bad.size > 20 else ""
    raise ValueError(
        f"label {path}: values {shown}{more} are outside the class range; "
        f"valid raw values are {valid} ({IGNORE_INDEX} = ignore)"
    )


def make_sample(rgb: np.ndarray, aux: np.ndarray, label: np.ndarray, stem: str) -> dict[str, Any]:
    """Assemble the sample dict from ``[H, W, 3]``/``[H, W, C]`` float32 and ``[H, W]`` int64."""
    h, w = label.shape
    return {
        "rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),  # [3, H, W]
        "aux": torch.from_numpy(np.ascontiguousarray(aux.transpose(2, 0, 1))),  # [C, H, W]
        "label": torch.from_numpy(np.ascontiguousarray(label)),  # [H, W] int64
        "meta": {"stem": stem, "size": (int(h), int(w))},
    }


# --------------------------------------------------------------------------------------
# Dataset base classes
# --------------------------------------------------------------------------------------
class SegDataset(Dataset):
    """Base of every RGB-X segmentation dataset (file readers and the synthetic world).

    Subclasses set :attr:`class_names` and :attr:`aux_channels` (per instance when they
    depend on options) and implement :meth:`load`, which returns an untransformed sample.
    ``transform`` (a callable on the sample dict, see :mod:`gopt_adapter.data.transforms`) is
    applied in ``__getitem__``.
    """

    #: Name used by the registry (``gopt_adapter.data.get_dataset``).
    name: str = ""
    class_names: tuple[str, ...] = ()
    aux_channels: int = 1
    ignore_index: int = IGNORE_INDEX

    def __init__(self, transform: Transform | None = None) -> None:
        self.transform = transform

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> dict[str, Any]:
        """Return sample ``index`` before transforms."""
        raise NotImplementedError

    def load_label(self, index: int) -> torch.Tensor:
        """The label map of sample ``index`` before transforms, int64 ``[H, W]`` (what the
        training labels' class frequencies are counted on); readers of files read no image for it."""
        return self.load(index)["label"]

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for {type(self).__name__} of length {len(self)}")
        sample = self.load(index % len(self))
        if self.transform is not None:
            sample = self.transform(sample)
        return sample


@dataclass(frozen=True)
class SampleFiles:
    """The files of one sample. ``aux`` may equal ``rgb`` (MFNet's 4-channel PNG)."""

    stem: str
    rgb: Path
    aux: Path
    label: Path


def find_sample_files(
    stem: str,
    rgb_dir: Path,
    aux_dir: Path,
    label_dir: Path,
    *,
    rgb_suffixes: Sequence[str] = (".png", ".jpg"),
    aux_suffixes: Sequence[str] = (".png",),
    aux_what: str = "aux image",
) -> SampleFiles:
    """The files of ``stem`` in parallel RGB / aux / label folders (labels are ``.png``).

    Looks them up in that order with :func:`find_image`, so the first missing one is named.
    """
    return SampleFiles(
        stem,
        find_image(rgb_dir, stem, rgb_suffixes, "RGB image"),
        find_image(aux_dir, stem, aux_suffixes, aux_what),
        find_image(label_dir, stem, (".png",), "label image"),
    )


class FileSegDataset(SegDataset):
    """A dataset read from files on disk in a documented public layout.

    Subclasses implement:

    * :meth:`_list_samples` -> the :class:`SampleFiles` of ``self.split`` (raise
      FileNotFoundError naming a missing folder/list file/image);
    * :meth:`_label_mapping` -> ``{raw value: class id}`` (unlisted raw values are errors,
      raw 255 is always ignore);
    * :meth:`_read_aux` -> the auxiliary modality as float32 ``[H, W, C_aux]`` in [0, 1];

    and may override :meth:`_read_rgb` (default: 3-channel uint8 / 255) and
    :meth:`_read_modalities` (when RGB and X share one file).

    ``expected_sizes`` maps split names to the documented split size; a mismatch is logged
    (tiny copies and custom splits are legitimate, so it is not an error).
    """

    splits: tuple[str, ...] = ()
    expected_sizes: Mapping[str, int] = {}

    def __init__(self, root: str | Path, split: str, transform: Transform | None = None) -> None:
        super().__init__(transform)
        if self.splits:
            check_choice("split", split, self.splits)
        self.root = require_dir(Path(root).expanduser(), f"{type(self).__name__} root folder")
        self.split = split
        self._lut = build_label_lut(self._label_mapping())
        self.samples: list[SampleFiles] = self._list_samples()
        if not self.samples:
            raise FileNotFoundError(f"no samples found for split {split!r} under {self.root}")
        expected = self.expected_sizes.get(split)
        if expected is not None and expected != len(self.samples):
            logger.warning(
                "%s split %r has %d samples on disk under %s; the documented size is %d",
                type(self).__name__, split, len(self.samples), self.root, expected,
            )

    # ---- to be declared by readers -------------------------------------------------
    def _list_samples(self) -> list[SampleFiles]:
        raise NotImplementedError

    def _label_mapping(self) -> Mapping[int, int]:
        raise NotImplementedError

    def _read_aux(self, path: Path) -> np.ndarray:
        raise NotImplementedError

    # ---- shared logic ---------------------------------------------------------------
    def _read_rgb(self, path: Path) -> np.ndarray:
        """RGB as float32 ``[H, W, 3]`` in [0, 1] from a 3-channel uint8 image."""
        arr = check_image(read_image(path), path, "RGB image", 3, (np.uint8,))
        return arr.astype(np.float32) * np.float32(1.0 / 255.0)

    def _read_modalities(self, files: SampleFiles) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(rgb [H, W, 3], aux [H, W, C])`` float32 in [0, 1]; checks sizes."""
        rgb = self._read_rgb(files.rgb)
        aux = self._read_aux(files.aux)
        check_same_size([(rgb, files.rgb), (aux, files.aux)])
        return rgb, aux

    def __len__(self) -> int:
        return len(self.samples)

    def load_label(self, index: int) -> torch.Tensor:
        files = self.samples[index]
        return torch.from_numpy(map_labels(read_image(files.label), self._lut, files.label))  # [H, W] int64

    def load(self, index: int) -> dict[str, Any]:
        files = self.samples[index]
        rgb, aux = self._read_modalities(files)
        raw_label = read_image(files.label)
        check_same_size([(rgb, files.rgb), (raw_label, files.label)])
        label = map_labels(raw_label, self._lut, files.label)  # [H, W] int64
        return make_sample(rgb, aux, label, files.stem)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, split={self.split!r}, "
            f"samples={len(self)}, classes={self.num_classes}, aux_channels={self.aux_channels})"
        )


def resolve_root(root: str | Path, folder_name: str) -> Path:
    """Accept either the dataset folder itself or its parent containing ``folder_name``."""
    root = Path(root).expanduser()
    nested = root / folder_name
    return nested if nested.is_dir() else root
