"""WHU-OPT-SAR tiling: geometry, seeded split, one read per scene, resume, command line."""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path

import numpy as np
import pytest
import tifffile

from datasets_helpers import make_whu_scenes
from gopt_adapter.cli import tile_whu
from gopt_adapter.data import whu_opt_sar
from gopt_adapter.data.whu_opt_sar import tile_whu_opt_sar

STEMS = ["NH49E001013", "NH49E001014", "NH49E001015", "NH49E001016", "NH49E001017"]


@pytest.fixture()
def scenes(tmp_path: Path) -> tuple[Path, dict]:
    # 40x56 at tile 16: 2 rows x 3 cols = 6 tiles per scene, remainders (8 and 8 px) dropped
    return tmp_path / "src", make_whu_scenes(tmp_path / "src", STEMS, h=40, w=56)


def test_tiles_cover_grid_and_copy_pixels(tmp_path: Path, scenes: tuple[Path, dict]) -> None:
    src, written = scenes
    index = tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, progress=False)
    assert len(index["tiles"]) == 5 * 6 and index["scenes_done"] == STEMS
    for tile in index["tiles"]:
        assert (tile["y"], tile["x"]) == (16 * tile["row"], 16 * tile["col"])
        assert tile["row"] < 2 and tile["col"] < 3
        win = (slice(tile["y"], tile["y"] + 16), slice(tile["x"], tile["x"] + 16))
        scene = written[tile["scene"]]
        optical = tifffile.imread(tmp_path / "out" / "optical" / f"{tile['name']}.tif")
        assert optical.shape == (16, 16, 4) and np.array_equal(optical, scene["optical"][win])
        assert np.array_equal(tifffile.imread(tmp_path / "out" / "sar" / f"{tile['name']}.tif"), scene["sar"][win])
        assert np.array_equal(tifffile.imread(tmp_path / "out" / "lbl" / f"{tile['name']}.tif"), scene["label"][win])


def test_paper_geometry_gives_70_tiles_per_scene() -> None:
    plan = whu_opt_sar._plan(["a", "b"], {"a": (3704, 5556), "b": (3704, 5556)}, 512, (0.6, 0.2, 0.2), 0, "tile")
    assert len(plan["a"]) == 70 and max(t["col"] for t in plan["a"]) == 9 and max(t["row"] for t in plan["a"]) == 6
    counts = {s: sum(t["split"] == s for ts in plan.values() for t in ts) for s in ("train", "val", "test")}
    assert counts == {"train": 84, "val": 28, "test": 28}


def test_split_is_60_20_20_and_seeded(tmp_path: Path, scenes: tuple[Path, dict]) -> None:
    src, _ = scenes
    a = tile_whu_opt_sar(src, tmp_path / "a", tile_size=16, seed=1, progress=False)
    b = tile_whu_opt_sar(src, tmp_path / "b", tile_size=16, seed=1, progress=False)
    c = tile_whu_opt_sar(src, tmp_path / "c", tile_size=16, seed=2, progress=False)
    splits = lambda index: [t["split"] for t in index["tiles"]]  # noqa: E731
    assert splits(a) == splits(b) and splits(a) != splits(c)
    assert {s: splits(a).count(s) for s in ("train", "val", "test")} == {"train": 18, "val": 6, "test": 6}
    by_scene = tile_whu_opt_sar(src, tmp_path / "d", tile_size=16, split_by="scene", progress=False)
    for stem in STEMS:
        assert len({t["split"] for t in by_scene["tiles"] if t["scene"] == stem}) == 1
    assert sorted(t["split"] for t in by_scene["tiles"]).count("train") == 3 * 6


def test_each_scene_read_once(tmp_path: Path, scenes: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = scenes
    reads: list[Path] = []
    real = whu_opt_sar.read_image
    monkeypatch.setattr(whu_opt_sar, "read_image", lambda p: reads.append(Path(p)) or real(p))
    tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, progress=False)
    assert len(reads) == 3 * len(STEMS) and len(set(reads)) == len(reads)


def test_resume_after_interruption(tmp_path: Path, scenes: tuple[Path, dict], monkeypatch: pytest.MonkeyPatch) -> None:
    src, _ = scenes
    reference = tile_whu_opt_sar(src, tmp_path / "ref", tile_size=16, seed=3, progress=False)
    real = whu_opt_sar.read_image
    reads: list[str] = []

    def crash_on_third_scene(path: Path):
        if Path(path).stem == STEMS[2]:
            raise KeyboardInterrupt("simulated interruption")
        reads.append(Path(path).stem)
        return real(path)

    monkeypatch.setattr(whu_opt_sar, "read_image", crash_on_third_scene)
    with pytest.raises(KeyboardInterrupt):
        tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, seed=3, progress=False)
    partial = json.loads((tmp_path / "out" / "index.json").read_text())
    assert partial["scenes_done"] == STEMS[:2] and len(partial["tiles"]) == 12
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.endswith(".tmp")]

    reads.clear()
    monkeypatch.setattr(whu_opt_sar, "read_image", lambda p: reads.append(Path(p).stem) or real(p))
    resumed = tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, seed=3, progress=False)
    assert sorted(set(reads)) == STEMS[2:]  # finished scenes are not read again
    assert resumed["tiles"] == reference["tiles"]  # same split as an uninterrupted run


def test_index_write_fsyncs_file_and_folder(tmp_path: Path, scenes: tuple[Path, dict],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """After each scene the index is fsynced and so is its folder (so the rename survives a crash)."""
    src, _ = scenes
    out = tmp_path / "out"
    synced: list[tuple[str, int]] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        st = os.fstat(fd)
        synced.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", st.st_ino))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    index = tile_whu_opt_sar(src, out, tile_size=16, progress=False)
    out_ino = os.stat(out).st_ino
    assert synced.count(("dir", out_ino)) == len(STEMS)  # once per scene, after the rename
    assert sum(kind == "file" for kind, _ in synced) >= len(STEMS)
    assert json.loads((out / "index.json").read_text()) == index
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_resume_with_other_settings_refused(tmp_path: Path, scenes: tuple[Path, dict]) -> None:
    src, _ = scenes
    tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, progress=False)
    with pytest.raises(ValueError, match=re.escape(str(tmp_path / "out" / "index.json"))):
        tile_whu_opt_sar(src, tmp_path / "out", tile_size=8, progress=False)


def test_image_folder_name_and_planar_tiff(tmp_path: Path) -> None:
    written = make_whu_scenes(tmp_path / "src", ["s"], h=16, w=32, optical_folder="image", planar=True)
    index = tile_whu_opt_sar(tmp_path / "src", tmp_path / "out", tile_size=16, progress=False)
    assert [t["name"] for t in index["tiles"]] == ["s_00_00", "s_00_01"]
    tile = tifffile.imread(tmp_path / "out" / "optical" / "s_00_01.tif")
    assert np.array_equal(tile, written["s"]["optical"][:, 16:])


def test_errors_name_files(tmp_path: Path, scenes: tuple[Path, dict]) -> None:
    src, _ = scenes
    missing = src / "sar" / f"{STEMS[1]}.tif"
    missing.unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, progress=False)
    tifffile.imwrite(missing, np.zeros((40, 50), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(missing))):
        tile_whu_opt_sar(src, tmp_path / "out", tile_size=16, progress=False)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "none"))):
        tile_whu_opt_sar(tmp_path / "none", tmp_path / "out")
    with pytest.raises(ValueError, match="fractions"):
        tile_whu_opt_sar(src, tmp_path / "out", fractions=(0.5, 0.2, 0.2))


def test_command_line_progress(tmp_path: Path, scenes: tuple[Path, dict], capsys: pytest.CaptureFixture) -> None:
    src, _ = scenes
    args = ["--root", str(src), "--out", str(tmp_path / "out"), "--tile-size", "16", "--seed", "4"]
    assert tile_whu.main(args) == 0
    err = capsys.readouterr().err
    assert all(f"{stem}: 6 tiles" in err for stem in STEMS) and "30 tiles from 5 scenes" in err
    assert tile_whu.main(args) == 0
    assert "already done, skipped" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        tile_whu.main(["--help"])
