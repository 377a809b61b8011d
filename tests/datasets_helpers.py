"""Builders of tiny copies of each dataset layout, in the real file formats.

Used by the dataset tests and by ``benchmarks/loader_throughput.py``. Each builder writes
random content of a given size and returns the raw arrays it wrote, keyed by stem, so tests
can compare what a reader returns with what is on disk.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import tifffile
from PIL import Image

#: ``../shared`` beside the repository (a checkout or worktree): data used, never shipped.
SHARED = Path(__file__).resolve().parents[1].parent / "shared"
FIXTURES = SHARED / "fixtures"  # small real sample files
FIELD = SHARED / "field"  # real datasets and weights for field tests (field/README.md)


def write_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)  # uint16 2-D arrays are written as 16-bit PNG


def write_jpg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=95)


def write_tif(path: Path, arr: np.ndarray, planar: bool = False) -> None:
    """Write ``[H, W]`` or ``[H, W, C]``; ``planar=True`` stores bands as ``[C, H, W]``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if arr.ndim == 3 and planar:
        tifffile.imwrite(path, np.ascontiguousarray(np.moveaxis(arr, -1, 0)), photometric="minisblack",
                         planarconfig="separate")
    elif arr.ndim == 3:
        tifffile.imwrite(path, arr, photometric="minisblack", planarconfig="contig")
    else:
        tifffile.imwrite(path, arr)


def _rgb(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def make_nyudv2(root: Path, splits: dict[str, list[str]], h: int = 8, w: int = 12, *,
                depth_dtype: Any = np.uint16, hha: bool = False, list_style: str = "stem",
                label_folder: str = "Label", num_classes: int = 40, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """NYUDv2 layout (``label_folder="labels"``, ``num_classes=37`` gives SUN RGB-D). ``list_style``:
    list lines as ``stem``, ``name`` (``stem.jpg``), ``path`` (``RGB/stem.jpg``) or ``pair``
    (``RGB/stem.jpg Label/stem.png``)."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, stems in splits.items():
        lines = []
        for stem in stems:
            rgb = _rgb(rng, h, w)
            high = 10_000 if depth_dtype == np.uint16 else 256
            depth = rng.integers(0, high, (h, w)).astype(depth_dtype)
            label = rng.integers(0, num_classes + 1, (h, w)).astype(np.uint8)  # 0 = unlabeled
            write_jpg(root / "RGB" / f"{stem}.jpg", rgb)
            write_png(root / "Depth" / f"{stem}.png", depth)
            write_png(root / label_folder / f"{stem}.png", label)
            entry = {"rgb": rgb, "depth": depth, "label": label}
            if hha:
                entry["hha"] = _rgb(rng, h, w)
                write_jpg(root / "HHA" / f"{stem}.jpg", entry["hha"])
            written[stem] = entry
            lines.append({"stem": stem, "name": f"{stem}.jpg", "path": f"RGB/{stem}.jpg",
                          "pair": f"RGB/{stem}.jpg {label_folder}/{stem}.png"}[list_style])
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return written


def make_rgbx(root: Path, splits: dict[str, list[str]], h: int = 8, w: int = 12, *, modality: str = "Depth",
              num_classes: int = 3, reduce_zero_label: bool = True, **options: Any) -> dict[str, dict[str, np.ndarray]]:
    """The ``--dataset rgbx`` (CMX / DFormer) layout: :func:`make_nyudv2`'s ``RGB/``, ``Depth/``
    (renamed ``modality``), ``Label/`` (raw 0..num_classes) and list files, plus a ``classes.txt``
    for reading raw 0 as unlabeled (``reduce_zero_label``: ``num_classes`` names) or as a class
    (``num_classes + 1`` names)."""
    written = make_nyudv2(root, splits, h, w, num_classes=num_classes, **options)
    if modality != "Depth":
        (root / "Depth").rename(root / modality)
    names = num_classes if reduce_zero_label else num_classes + 1
    (root / "classes.txt").write_text("".join(f"class{k}\n" for k in range(names)))
    return written


def make_mfnet(root: Path, splits: dict[str, list[str]], h: int = 8, w: int = 12, *,
               layout: str = "official", seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """MFNet official (4-channel PNG) or folder (RGB/Thermal/Label) layout."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, stems in splits.items():
        for stem in stems:
            rgbt = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
            label = rng.integers(0, 9, (h, w)).astype(np.uint8)
            if layout == "official":
                write_png(root / "images" / f"{stem}.png", rgbt)  # RGBA PNG
                write_png(root / "labels" / f"{stem}.png", label)
            else:
                write_png(root / "RGB" / f"{stem}.png", rgbt[:, :, :3])
                write_png(root / "Thermal" / f"{stem}.png", rgbt[:, :, 3])
                write_png(root / "Label" / f"{stem}.png", label)
            written[stem] = {"rgbt": rgbt, "label": label}
        (root / f"{split}.txt").write_text("\n".join(stems) + "\n")
    return written


def make_pst900(root: Path, splits: dict[str, list[str]], h: int = 8, w: int = 12,
                seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """PST900 layout: ``{split}/{rgb,thermal,labels}/<stem>.png``, no list files."""
    rng = np.random.default_rng(seed)
    written = {}
    for split, stems in splits.items():
        for stem in stems:
            rgb = _rgb(rng, h, w)
            thermal = rng.integers(0, 256, (h, w), dtype=np.uint8)
            label = rng.integers(0, 5, (h, w)).astype(np.uint8)
            write_png(root / split / "rgb" / f"{stem}.png", rgb)
            write_png(root / split / "thermal" / f"{stem}.png", thermal)
            write_png(root / split / "labels" / f"{stem}.png", label)
            written[stem] = {"rgb": rgb, "thermal": thermal, "label": label}
    return written


def make_whu_scenes(root: Path, stems: list[str], h: int = 40, w: int = 56, *, optical_folder: str = "optical",
                    planar: bool = False, dtype: Any = np.uint8, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """WHU-OPT-SAR source layout: 4-band optical, 1-band SAR, labels 0, 10, ..., 70 (TIFF)."""
    rng = np.random.default_rng(seed)
    high = 256 if dtype == np.uint8 else 4096
    written = {}
    for stem in stems:
        optical = rng.integers(0, high, (h, w, 4)).astype(dtype)  # B, G, R, NIR
        sar = rng.integers(0, high, (h, w)).astype(dtype)
        label = (rng.integers(0, 8, (h, w)) * 10).astype(np.uint8)
        write_tif(root / optical_folder / f"{stem}.tif", optical, planar=planar)
        write_tif(root / "sar" / f"{stem}.tif", sar)
        write_tif(root / "lbl" / f"{stem}.tif", label)
        written[stem] = {"optical": optical, "sar": sar, "label": label}
    return written


def make_folder(root: Path, splits: dict[str, int], h: int = 32, w: int = 48, classes=("floor", "wall", "table"),
                aux: str = "depth16", seed: int = 0) -> dict[str, dict[str, Any]]:
    """The ``--dataset folder`` layout: ``classes.txt`` and ``<split>/{rgb,aux,label}``.

    ``aux``: ``"depth16"`` (uint16 PNG, millimetres), ``"thermal8"`` (uint8 PNG), ``"npy3"``
    (float32 ``[H, W, 3]`` .npy) or ``"tif2"`` (uint16 2-band TIFF). The label is the class of
    the aux value's third (so it can be learned from aux), with a 255 corner. Returns the
    raw arrays by stem.
    """
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    written: dict[str, dict[str, Any]] = {}
    for split, count in splits.items():
        for i in range(count):
            stem = f"{split}_{i:03d}"
            rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
            level = rng.random((h, w))  # [0, 1)
            label = np.minimum((level * len(classes)).astype(np.uint8), len(classes) - 1)
            label[:2, :2] = 255
            write_png(root / split / "rgb" / f"{stem}.png", rgb)
            if aux == "depth16":
                raw = (500 + level * 9000).astype(np.uint16)
                write_png(root / split / "aux" / f"{stem}.png", raw)
            elif aux == "thermal8":
                raw = (level * 255).astype(np.uint8)
                write_png(root / split / "aux" / f"{stem}.png", raw)
            elif aux == "npy3":
                raw = np.stack([level, 1 - level, level ** 2], axis=-1).astype(np.float32)
                (root / split / "aux").mkdir(parents=True, exist_ok=True)
                np.save(root / split / "aux" / f"{stem}.npy", raw)
            elif aux == "tif2":
                raw = np.stack([level * 60000, (1 - level) * 60000], axis=-1).astype(np.uint16)
                write_tif(root / split / "aux" / f"{stem}.tif", raw)
            else:
                raise ValueError(aux)
            write_png(root / split / "label" / f"{stem}.png", label)
            written[stem] = {"rgb": rgb, "aux": raw, "label": label}
    return written
