"""WHU-OPT-SAR ("WHU-OS"): optical + SAR land cover, 100 scenes of 5556x3704 px.

Source layout (what users download)::

    optical/<stem>.tif   4 bands B, G, R, NIR (some copies name the folder image/)
    sar/<stem>.tif       1 band
    lbl/<stem>.tif       values 0, 10, ..., 70 (class = value / 10)

Scenes are far too large to train on, so they are first cut into non-overlapping tiles with
:func:`tile_whu_opt_sar` (command line: ``python -m gopt_adapter.cli.tile_whu --root SRC --out
DST``). The tiled folder has the same three sub-folders plus ``index.json``, and is what
:class:`WHUOptSar` reads.

Classes: 0 background, 1 farmland, 2 city, 3 village, 4 water, 5 forest, 6 road, 7 others.
The paper speaks of 6 land-cover classes without saying whether background and "others"
count; ``include_background`` and ``include_others`` choose, and should be recorded with
every result. An excluded class is mapped to the ignore value and the remaining classes are
renumbered in order.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import tifffile

from ..atomic_files import atomic_write_bytes
from ..preprocessing import AUX_NORMALIZATIONS, AuxNormalization, scale_to_unit
from .base import (
    FileSegDataset,
    SampleFiles,
    Transform,
    check_choice,
    check_image,
    check_same_size,
    find_image,
    read_image,
    require_dir,
    require_file,
)

__all__ = ["WHUOptSar", "WHU_OPT_SAR_CLASSES", "tile_whu_opt_sar", "INDEX_NAME"]

WHU_OPT_SAR_CLASSES: tuple[str, ...] = (
    "background", "farmland", "city", "village", "water", "forest", "road", "others",
)
#: Raw label value of class k is ``LABEL_STEP * k``.
LABEL_STEP = 10
INDEX_NAME = "index.json"
_INDEX_VERSION = 1
_SPLITS = ("train", "val", "test")
_TIFF_SUFFIXES = (".tif", ".tiff")


class WHUOptSar(FileSegDataset):
    """Reader of a tiled WHU-OPT-SAR folder (the output of :func:`tile_whu_opt_sar`).

    Args:
        root: the tiled folder containing ``index.json``.
        split: ``"train"``, ``"val"`` or ``"test"``.
        include_background: count class 0 "background" (default ``True``); if ``False`` it
            becomes the ignore value.
        include_others: count class 7 "others" (default ``True``); if ``False`` it becomes
            the ignore value.
        optical_normalization: ``"fixed"`` (default: divide by the dtype maximum, e.g. 255
            for uint8 bands) or ``"per_image"`` (min-max over the tile's RGB bands).
        sar_normalization: same choice for the SAR band (float SAR needs ``"per_image"``).
        nir_as_aux: also return the NIR band as a second aux channel (default ``False``).
        transform: joint transform applied to each sample.

    ``rgb`` = optical bands R, G, B in [0, 1]; ``aux`` = SAR (then NIR) in [0, 1].
    """

    name = "whu_opt_sar"
    splits = _SPLITS
    expected_sizes = {"train": 4200, "val": 1400, "test": 1400}

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        include_background: bool = True,
        include_others: bool = True,
        optical_normalization: AuxNormalization = "fixed",
        sar_normalization: AuxNormalization = "fixed",
        nir_as_aux: bool = False,
        transform: Transform | None = None,
    ) -> None:
        check_choice("optical_normalization", optical_normalization, AUX_NORMALIZATIONS)
        check_choice("sar_normalization", sar_normalization, AUX_NORMALIZATIONS)
        self.include_background = bool(include_background)
        self.include_others = bool(include_others)
        self.kept_raw_classes = tuple(
            k
            for k in range(len(WHU_OPT_SAR_CLASSES))
            if (k != 0 or self.include_background) and (k != 7 or self.include_others)
        )
        self.class_names = tuple(WHU_OPT_SAR_CLASSES[k] for k in self.kept_raw_classes)
        self.optical_normalization = optical_normalization
        self.sar_normalization = sar_normalization
        self.nir_as_aux = bool(nir_as_aux)
        self.aux_channels = 2 if self.nir_as_aux else 1
        super().__init__(root, split, transform)

    def _label_mapping(self) -> Mapping[int, int]:
        mapping = {LABEL_STEP * k: self.ignore_index for k in range(len(WHU_OPT_SAR_CLASSES))}
        for new, raw_class in enumerate(self.kept_raw_classes):
            mapping[LABEL_STEP * raw_class] = new
        return mapping

    def _list_samples(self) -> list[SampleFiles]:
        index = _load_index(require_file(self.root / INDEX_NAME, "WHU-OPT-SAR tile index (run `python -m gopt_adapter.cli.tile_whu`)"))
        folders = {name: require_dir(self.root / name, f"tile folder {name}") for name in ("optical", "sar", "lbl")}
        return [
            SampleFiles(
                tile["name"],
                folders["optical"] / f"{tile['name']}.tif",
                folders["sar"] / f"{tile['name']}.tif",
                folders["lbl"] / f"{tile['name']}.tif",
            )
            for tile in index["tiles"]
            if tile["split"] == self.split
        ]

    def _read_modalities(self, files: SampleFiles) -> tuple[np.ndarray, np.ndarray]:
        optical = check_image(read_image(files.rgb), files.rgb, "optical image (B, G, R, NIR)", 4)
        sar = check_image(read_image(files.aux), files.aux, "SAR image", 1)
        check_same_size([(optical, files.rgb), (sar, files.aux)])
        rgb = scale_to_unit(optical[:, :, [2, 1, 0]], self.optical_normalization, None, files.rgb)  # [H, W, 3]
        aux = scale_to_unit(sar, self.sar_normalization, None, files.aux)  # [H, W, 1]
        if self.nir_as_aux:
            nir = scale_to_unit(optical[:, :, 3:], self.optical_normalization, None, files.rgb)
            aux = np.concatenate([aux, nir], axis=2)  # [H, W, 2]
        return rgb, aux

    def _read_aux(self, path: Path) -> np.ndarray:  # pragma: no cover - _read_modalities reads both
        raise NotImplementedError("WHU-OPT-SAR reads optical and SAR together")


# --------------------------------------------------------------------------------------
# Tiling
# --------------------------------------------------------------------------------------
def _load_index(path: Path) -> dict[str, Any]:
    try:
        index = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"tile index {path} is not valid JSON: {exc}") from exc
    if index.get("version") != _INDEX_VERSION or "tiles" not in index:
        raise ValueError(f"tile index {path}: unknown format (version {index.get('version')!r})")
    return index


def _tiff_hw(path: Path) -> tuple[int, int]:
    """Height and width of a TIFF from its header, without reading pixel data."""
    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        shape, axes = series.shape, series.axes
    return int(shape[axes.index("Y")]), int(shape[axes.index("X")])


def _find_scenes(root: Path) -> tuple[list[str], dict[str, Path]]:
    root = require_dir(Path(root).expanduser(), "WHU-OPT-SAR root folder")
    optical_dir = root / "optical" if (root / "optical").is_dir() else root / "image"
    folders = {
        "optical": require_dir(optical_dir, "optical folder (optical/ or image/)"),
        "sar": require_dir(root / "sar", "SAR folder"),
        "lbl": require_dir(root / "lbl", "label folder"),
    }
    stems = sorted(p.stem for p in folders["optical"].iterdir() if p.suffix.lower() in _TIFF_SUFFIXES)
    if not stems:
        raise FileNotFoundError(f"no .tif scenes found in {folders['optical']}")
    return stems, folders


def _split_counts(n: int, fractions: Sequence[float]) -> list[int]:
    n_train = int(round(fractions[0] * n))
    n_val = int(round(fractions[1] * n))
    return [n_train, n_val, n - n_train - n_val]


def _plan(
    stems: list[str], sizes: dict[str, tuple[int, int]], tile_size: int,
    fractions: Sequence[float], seed: int, split_by: str,
) -> dict[str, list[dict[str, Any]]]:
    """Every tile of every scene with its split; deterministic in (scenes, sizes, seed)."""
    tiles = {
        stem: [
            {"name": f"{stem}_{r:02d}_{c:02d}", "scene": stem, "row": r, "col": c,
             "y": r * tile_size, "x": c * tile_size}
            for r in range(sizes[stem][0] // tile_size)
            for c in range(sizes[stem][1] // tile_size)
        ]
        for stem in stems
    }
    units: list[Any] = stems if split_by == "scene" else [(s, i) for s in stems for i in range(len(tiles[s]))]
    order = np.random.default_rng(seed).permutation(len(units))
    counts = _split_counts(len(units), fractions)
    split_of_rank = [split for split, count in zip(_SPLITS, counts) for _ in range(count)]
    for rank, unit_idx in enumerate(order.tolist()):
        unit = units[unit_idx]
        if split_by == "scene":
            for tile in tiles[unit]:
                tile["split"] = split_of_rank[rank]
        else:
            tiles[unit[0]][unit[1]]["split"] = split_of_rank[rank]
    return tiles


def tile_whu_opt_sar(
    root: str | Path,
    out: str | Path,
    *,
    tile_size: int = 512,
    fractions: Sequence[float] = (0.6, 0.2, 0.2),
    seed: int = 0,
    split_by: Literal["tile", "scene"] = "tile",
    progress: bool = True,
) -> dict[str, Any]:
    """Cut WHU-OPT-SAR scenes into non-overlapping tiles and split them train/val/test.

    * Tiles are ``tile_size`` squares at stride ``tile_size``; the right and bottom
      remainders are dropped (5556x3704 at 512 gives 10x7 = 70 tiles per scene).
    * The split is a seeded permutation of all tiles (``split_by="tile"``, the paper's
      patch-level 60/20/20) or of whole scenes (``split_by="scene"``, no scene shared
      between splits), decided from the TIFF headers before any pixel is read, so it does
      not depend on processing order or on interruptions.
    * Each scene is read once and all its tiles are written from memory.
    * ``out/index.json`` records the settings, the finished scenes and their tiles; it is
      rewritten atomically after each scene. Running again with the same settings skips
      finished scenes (resume); different settings raise ValueError.

    Writes ``out/{optical,sar,lbl}/<scene>_<row>_<col>.tif`` in the source dtypes and
    returns the index dict.
    """
    if tile_size <= 0:
        raise ValueError(f"tile_size must be positive, got {tile_size}")
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    check_choice("split_by", split_by, ("tile", "scene"))
    stems, folders = _find_scenes(Path(root))
    paths = {
        stem: {
            "optical": find_image(folders["optical"], stem, _TIFF_SUFFIXES, "optical scene"),
            "sar": find_image(folders["sar"], stem, _TIFF_SUFFIXES, "SAR scene"),
            "lbl": find_image(folders["lbl"], stem, _TIFF_SUFFIXES, "label scene"),
        }
        for stem in stems
    }
    sizes = {stem: _tiff_hw(paths[stem]["optical"]) for stem in stems}
    plan = _plan(stems, sizes, tile_size, fractions, seed, split_by)

    out = Path(out).expanduser()
    for name in ("optical", "sar", "lbl"):
        (out / name).mkdir(parents=True, exist_ok=True)
    settings = {"tile_size": tile_size, "fractions": [float(f) for f in fractions], "seed": seed,
                "split_by": split_by, "scenes": stems}
    index_path = out / INDEX_NAME
    if index_path.exists():
        index = _load_index(index_path)
        stored = {key: index.get(key) for key in settings}
        if stored != settings:
            changed = sorted(k for k in settings if stored[k] != settings[k])
            raise ValueError(f"tile index {index_path} was written with different settings ({changed}); "
                             f"use another --out or the same settings to resume")
    else:
        index = {"version": _INDEX_VERSION, **settings, "scenes_done": [], "tiles": []}
    done = set(index["scenes_done"])

    for i, stem in enumerate(stems, 1):
        if stem in done:
            if progress:
                print(f"[{i}/{len(stems)}] {stem}: already done, skipped", file=sys.stderr, flush=True)
            continue
        optical = check_image(read_image(paths[stem]["optical"]), paths[stem]["optical"], "optical scene", 4)
        sar = check_image(read_image(paths[stem]["sar"]), paths[stem]["sar"], "SAR scene", 1)
        lbl = check_image(read_image(paths[stem]["lbl"]), paths[stem]["lbl"], "label scene", 1)
        check_same_size([(optical, paths[stem]["optical"]), (sar, paths[stem]["sar"]), (lbl, paths[stem]["lbl"])])
        for tile in plan[stem]:
            window = (slice(tile["y"], tile["y"] + tile_size), slice(tile["x"], tile["x"] + tile_size))
            tifffile.imwrite(out / "optical" / f"{tile['name']}.tif", optical[window], photometric="minisblack",
                             planarconfig="contig")  # [T, T, 4]
            tifffile.imwrite(out / "sar" / f"{tile['name']}.tif", sar[window][:, :, 0])  # [T, T]
            tifffile.imwrite(out / "lbl" / f"{tile['name']}.tif", lbl[window][:, :, 0])  # [T, T]
        index["tiles"].extend(plan[stem])
        index["scenes_done"].append(stem)
        # Atomic (old or new file, never a partial one) and durable (file and folder fsynced).
        atomic_write_bytes(index_path, json.dumps(index, indent=1).encode())
        if progress:
            print(f"[{i}/{len(stems)}] {stem}: {len(plan[stem])} tiles", file=sys.stderr, flush=True)
    return index
