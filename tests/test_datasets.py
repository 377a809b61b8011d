"""Readers on tiny copies of each layout (real formats), on the real fixture files, and errors."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from datasets_helpers import (FIXTURES, make_folder, make_mfnet, make_nyudv2, make_pst900, make_rgbx,
                              make_whu_scenes, write_png, write_tif)
from gopt_adapter.data import (
    DATASETS,
    MFNet,
    NYUDv2,
    PST900,
    SUNRGBD,
    SyntheticRGBX,
    WHUOptSar,
    get_dataset,
    read_image,
    tile_whu_opt_sar,
)


def decode(path: Path) -> np.ndarray:
    """Independent decode of an 8-bit image to float in [0, 1] (pillow, no project code)."""
    return np.asarray(Image.open(path), dtype=np.float32) / 255.0


def chw(arr: np.ndarray) -> torch.Tensor:
    arr = arr if arr.ndim == 3 else arr[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


def shifted(raw: np.ndarray) -> torch.Tensor:
    """The NYUDv2 / SUN RGB-D label convention computed independently: 0 -> 255, k -> k-1."""
    out = raw.astype(np.int64) - 1
    out[raw == 0] = 255
    return torch.from_numpy(out)


def check_sample(sample: dict, h: int, w: int, aux_channels: int, num_classes: int) -> None:
    assert sample["rgb"].shape == (3, h, w) and sample["rgb"].dtype == torch.float32
    assert sample["aux"].shape == (aux_channels, h, w) and sample["aux"].dtype == torch.float32
    assert sample["label"].shape == (h, w) and sample["label"].dtype == torch.int64
    for key in ("rgb", "aux"):
        assert 0.0 <= float(sample[key].min()) and float(sample[key].max()) <= 1.0
    labels = sample["label"]
    assert bool(((labels >= 0) & (labels < num_classes) | (labels == 255)).all())
    assert sample["meta"]["size"] == (h, w)


# --------------------------------------------------------------------------------------
# NYUDv2 / SUN RGB-D
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("list_style", ["stem", "path"])
def test_nyudv2_uint16_depth_values(tmp_path: Path, list_style: str) -> None:
    root = tmp_path / "NYUDepthv2"
    written = make_nyudv2(root, {"train": ["0001", "0002"], "test": ["0003"]}, list_style=list_style)
    ds = NYUDv2(tmp_path, "train")  # parent folder accepted
    assert len(ds) == 2 and ds.num_classes == 40 and ds.aux_channels == 1 and ds.ignore_index == 255
    assert ds.class_names[0] == "wall" and ds.class_names[-1] == "otherprop"
    for i, stem in enumerate(["0001", "0002"]):
        sample = ds[i]
        check_sample(sample, 8, 12, 1, 40)
        assert sample["meta"]["stem"] == stem
        assert torch.allclose(sample["rgb"], chw(decode(root / "RGB" / f"{stem}.jpg")))
        depth = np.clip(written[stem]["depth"].astype(np.float32) / 10_000.0, 0, 1)
        assert torch.allclose(sample["aux"], chw(depth))
        assert torch.equal(sample["label"], shifted(written[stem]["label"]))
    assert len(NYUDv2(root, "test")) == 1


def test_nyudv2_uint8_depth_per_image_and_hha(tmp_path: Path) -> None:
    root = tmp_path / "NYUDepthv2"
    written = make_nyudv2(root, {"train": ["a"]}, depth_dtype=np.uint8, hha=True)
    depth = written["a"]["depth"].astype(np.float32)
    assert torch.allclose(NYUDv2(root)[0]["aux"], chw(depth / 255.0))
    per_image = (depth - depth.min()) / (depth.max() - depth.min())
    assert torch.allclose(NYUDv2(root, depth_normalization="per_image")[0]["aux"], chw(per_image), atol=1e-6)
    hha = NYUDv2(root, aux="hha")
    assert hha.aux_channels == 3
    assert torch.allclose(hha[0]["aux"], chw(decode(root / "HHA" / "a.jpg")))


def test_sunrgbd_layout_and_classes(tmp_path: Path) -> None:
    root = tmp_path / "SUNRGBD"
    written = make_nyudv2(root, {"train": ["s1"], "test": ["s2", "s3"]}, h=10, w=7, label_folder="labels", num_classes=37)
    ds = SUNRGBD(root, "test")
    assert len(ds) == 2 and ds.num_classes == 37 and ds.class_names == NYUDv2.class_names[:37]
    sample = ds[1]
    check_sample(sample, 10, 7, 1, 37)
    assert torch.equal(sample["label"], shifted(written["s3"]["label"]))
    # NYUDv2's "Label" folder is not SUN RGB-D's "labels"
    (root / "labels").rename(root / "Label")
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "labels"))):
        SUNRGBD(root, "test")


# --------------------------------------------------------------------------------------
# MFNet
# --------------------------------------------------------------------------------------
def test_mfnet_official_four_channel_png(tmp_path: Path) -> None:
    written = make_mfnet(tmp_path, {"train": ["00001D", "00002N"], "test": ["00003N"]})
    ds = MFNet(tmp_path, "train")
    assert ds.layout == "official" and ds.num_classes == 9 and ds.class_names[0] == "unlabeled"
    sample = ds[1]
    check_sample(sample, 8, 12, 1, 9)
    rgbt = written["00002N"]["rgbt"].astype(np.float32) / 255.0
    assert torch.allclose(sample["rgb"], chw(rgbt[:, :, :3]))
    assert torch.allclose(sample["aux"], chw(rgbt[:, :, 3]))
    assert torch.equal(sample["label"], torch.from_numpy(written["00002N"]["label"].astype(np.int64)))

    no_unlabeled = MFNet(tmp_path, "train", count_unlabeled=False)
    assert no_unlabeled.num_classes == 8 and no_unlabeled.class_names[0] == "car"
    raw = written["00002N"]["label"].astype(np.int64)
    expected = np.where(raw == 0, 255, raw - 1)
    assert torch.equal(no_unlabeled[1]["label"], torch.from_numpy(expected))


def test_mfnet_folder_layout_autodetected(tmp_path: Path) -> None:
    written = make_mfnet(tmp_path, {"train_val": ["1D", "2N", "3D"], "test": ["4N"]}, layout="folders", h=6, w=5)
    ds = MFNet(tmp_path, "train_val", thermal_normalization="per_image")
    assert ds.layout == "folders" and len(ds) == 3
    sample = ds[2]
    check_sample(sample, 6, 5, 1, 9)
    thermal = written["3D"]["rgbt"][:, :, 3].astype(np.float32)
    expected = (thermal - thermal.min()) / (thermal.max() - thermal.min())
    assert torch.allclose(sample["aux"], chw(expected), atol=1e-6)
    assert torch.allclose(sample["rgb"], chw(written["3D"]["rgbt"][:, :, :3].astype(np.float32) / 255.0))


def test_mfnet_folder_layout_size_mismatch_names_files(tmp_path: Path) -> None:
    """Separate RGB and thermal files can differ in size (the 4-channel PNG cannot)."""
    make_mfnet(tmp_path, {"train_val": ["1D"]}, layout="folders")
    bad = tmp_path / "Thermal" / "1D.png"
    write_png(bad, np.zeros((7, 12), np.uint8))
    with pytest.raises(ValueError, match="differ in size") as err:
        MFNet(tmp_path, "train_val")[0]
    assert str(bad) in str(err.value) and "7x12" in str(err.value) and "8x12" in str(err.value)


# --------------------------------------------------------------------------------------
# PST900
# --------------------------------------------------------------------------------------
def test_pst900_sorted_stems_and_values(tmp_path: Path) -> None:
    root = tmp_path / "PST900_RGBT_Dataset"
    written = make_pst900(root, {"train": ["b", "a", "c"], "test": ["z"]})
    ds = PST900(tmp_path, "train")
    assert [s.stem for s in ds.samples] == ["a", "b", "c"]
    assert ds.num_classes == 5 and ds.class_names[0] == "background"
    sample = ds[0]
    check_sample(sample, 8, 12, 1, 5)
    assert torch.allclose(sample["rgb"], chw(written["a"]["rgb"].astype(np.float32) / 255.0))
    assert torch.allclose(sample["aux"], chw(written["a"]["thermal"].astype(np.float32) / 255.0))
    assert torch.equal(sample["label"], torch.from_numpy(written["a"]["label"].astype(np.int64)))


# --------------------------------------------------------------------------------------
# WHU-OPT-SAR
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("planar,dtype", [(False, np.uint8), (True, np.uint16)])
def test_whu_tiles_values(tmp_path: Path, planar: bool, dtype: type) -> None:
    written = make_whu_scenes(tmp_path / "src", ["s1", "s2"], h=20, w=33, planar=planar, dtype=dtype)
    index = tile_whu_opt_sar(tmp_path / "src", tmp_path / "tiles", tile_size=16, progress=False)
    tiles = {t["name"]: t for t in index["tiles"]}
    scale = float(np.iinfo(dtype).max)
    for split in ("train", "val", "test"):
        ds = WHUOptSar(tmp_path / "tiles", split)
        assert ds.num_classes == 8 and ds.aux_channels == 1
        for i in range(len(ds)):
            sample = ds[i]
            check_sample(sample, 16, 16, 1, 8)
            t = tiles[sample["meta"]["stem"]]
            win = (slice(t["y"], t["y"] + 16), slice(t["x"], t["x"] + 16))
            src = written[t["scene"]]
            assert torch.allclose(sample["rgb"], chw(src["optical"][win][:, :, [2, 1, 0]].astype(np.float32) / scale))
            assert torch.allclose(sample["aux"], chw(src["sar"][win].astype(np.float32) / scale))
            assert torch.equal(sample["label"], torch.from_numpy(src["label"][win].astype(np.int64) // 10))


def test_whu_class_options_and_nir(tmp_path: Path) -> None:
    written = make_whu_scenes(tmp_path / "src", ["s1"], h=16, w=16)
    tile_whu_opt_sar(tmp_path / "src", tmp_path / "tiles", tile_size=16, fractions=(1.0, 0.0, 0.0), progress=False)
    raw = written["s1"]["label"].astype(np.int64) // 10
    ds = WHUOptSar(tmp_path / "tiles", "train", include_background=False, include_others=False, nir_as_aux=True)
    assert ds.class_names == ("farmland", "city", "village", "water", "forest", "road")
    expected = np.where((raw == 0) | (raw == 7), 255, raw - 1)
    sample = ds[0]
    assert torch.equal(sample["label"], torch.from_numpy(expected))
    assert sample["aux"].shape == (2, 16, 16)
    assert torch.allclose(sample["aux"][1], torch.from_numpy(written["s1"]["optical"][:, :, 3] / 255.0).float())
    only_others = WHUOptSar(tmp_path / "tiles", "train", include_others=False)
    assert only_others.num_classes == 7 and torch.equal(
        only_others[0]["label"], torch.from_numpy(np.where(raw == 7, 255, raw))
    )


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------
def test_registry_builds_every_dataset(tmp_path: Path) -> None:
    make_nyudv2(tmp_path / "nyu", {"train": ["a"]})
    make_nyudv2(tmp_path / "sun", {"train": ["a"]}, label_folder="labels", num_classes=37)
    make_mfnet(tmp_path / "mf", {"train": ["1D"]})
    make_pst900(tmp_path / "pst", {"train": ["a"]})
    make_whu_scenes(tmp_path / "whu", ["s"], h=16, w=16)
    tile_whu_opt_sar(tmp_path / "whu", tmp_path / "whu_tiles", tile_size=16, fractions=(1, 0, 0), progress=False)
    make_folder(tmp_path / "own", {"train": 1})
    make_rgbx(tmp_path / "cmx", {"train": ["a"]}, reduce_zero_label=False)
    roots = {"nyudv2": "nyu", "sunrgbd": "sun", "mfnet": "mf", "pst900": "pst", "whu_opt_sar": "whu_tiles",
             "folder": "own", "rgbx": "cmx"}
    assert set(DATASETS) == set(roots) | {"synthetic"}
    for name, folder in roots.items():
        ds = get_dataset(name, root=tmp_path / folder, split="train")
        assert isinstance(ds, DATASETS[name]) and len(ds) == 1
    syn = get_dataset("synthetic", mode="thermal", split="val", size=32, length=3, seed=1)
    assert isinstance(syn, SyntheticRGBX) and len(syn) == 3 and syn[0]["rgb"].shape == (3, 32, 32)
    assert get_dataset("MFNet", root=tmp_path / "mf", count_unlabeled=False).num_classes == 8
    with pytest.raises(ValueError, match="unknown dataset"):
        get_dataset("cityscapes", root=tmp_path)
    with pytest.raises(ValueError, match="root"):
        get_dataset("nyudv2")
    with pytest.raises(ValueError, match="split"):
        get_dataset("nyudv2", root=tmp_path / "nyu", split="val")


def test_default_collate(tmp_path: Path) -> None:
    make_mfnet(tmp_path, {"train": ["1D", "2N"]})
    batch = next(iter(torch.utils.data.DataLoader(MFNet(tmp_path), batch_size=2)))
    assert batch["rgb"].shape == (2, 3, 8, 12) and batch["label"].shape == (2, 8, 12)
    assert batch["meta"]["stem"] == ["1D", "2N"]


# --------------------------------------------------------------------------------------
# Real sample files
# --------------------------------------------------------------------------------------
needs_fixtures = pytest.mark.skipif(not FIXTURES.is_dir(), reason="../shared/fixtures not present")


@needs_fixtures
def test_fixture_files_decode() -> None:
    rgbt = read_image(FIXTURES / "mfnet" / "01234N.png")
    assert rgbt.shape == (480, 640, 4) and rgbt.dtype == np.uint8
    depth = read_image(FIXTURES / "rgbd" / "sample_depth.png")
    assert depth.shape == (424, 512) and depth.dtype == np.uint16
    assert 0.05 < float((depth == 0).mean()) < 0.2  # "about 11%" holes
    rgb = read_image(FIXTURES / "rgbd" / "sample_rgb.png")
    assert rgb.shape == (424, 512, 3) and rgb.dtype == np.uint8


@needs_fixtures
def test_fixture_mfnet_through_reader(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    stems = ["01234N", "01477D"]
    for stem in stems:
        os.symlink(FIXTURES / "mfnet" / f"{stem}.png", tmp_path / "images" / f"{stem}.png")
        write_png(tmp_path / "labels" / f"{stem}.png", np.full((480, 640), 2, np.uint8))
    (tmp_path / "test.txt").write_text("\n".join(stems))
    ds = MFNet(tmp_path, "test")
    for i, stem in enumerate(stems):
        sample = ds[i]
        check_sample(sample, 480, 640, 1, 9)
        raw = np.asarray(Image.open(FIXTURES / "mfnet" / f"{stem}.png"), dtype=np.float32) / 255.0
        assert torch.allclose(sample["rgb"], chw(raw[:, :, :3]))
        assert torch.allclose(sample["aux"], chw(raw[:, :, 3]))
    night, day = ds[0], ds[1]
    # The night frame is dark in RGB; the day frame is not.
    assert float(night["rgb"].mean()) < float(day["rgb"].mean())


@needs_fixtures
def test_fixture_rgbd_through_nyudv2_reader(tmp_path: Path) -> None:
    for folder, name in (("RGB", "sample_rgb.png"), ("Depth", "sample_depth.png")):
        (tmp_path / folder).mkdir()
        os.symlink(FIXTURES / "rgbd" / name, tmp_path / folder / "sample.png")
    write_png(tmp_path / "Label" / "sample.png", np.full((424, 512), 5, np.uint8))
    (tmp_path / "train.txt").write_text("RGB/sample.png\n")
    sample = NYUDv2(tmp_path, "train", depth_max_mm=10_000)[0]
    check_sample(sample, 424, 512, 1, 40)
    raw_depth = np.asarray(Image.open(FIXTURES / "rgbd" / "sample_depth.png")).astype(np.float32)
    assert torch.allclose(sample["aux"], chw(np.clip(raw_depth / 10_000.0, 0, 1)))
    assert float((sample["aux"] == 0).float().mean()) == pytest.approx(float((raw_depth == 0).mean()))
    assert torch.allclose(sample["rgb"], chw(decode(FIXTURES / "rgbd" / "sample_rgb.png")))
    assert bool((sample["label"] == 4).all())


# --------------------------------------------------------------------------------------
# Errors name the file
# --------------------------------------------------------------------------------------
def test_missing_root_split_and_image(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        NYUDv2(missing)
    root = tmp_path / "NYUDepthv2"
    make_nyudv2(root, {"train": ["a", "b"]})
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "test.txt"))):
        NYUDv2(root, "test")
    (root / "Depth" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(root / "Depth" / "b.png"))):
        NYUDv2(root)
    (tmp_path / "pst").mkdir()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "pst" / "train"))):
        PST900(tmp_path / "pst")
    with pytest.raises(FileNotFoundError, match="index.json"):
        WHUOptSar(tmp_path)


def test_pst900_missing_thermal_names_file(tmp_path: Path) -> None:
    make_pst900(tmp_path, {"train": ["a", "b"]})
    (tmp_path / "train" / "thermal" / "b.png").unlink()
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "train" / "thermal" / "b.png"))):
        PST900(tmp_path)


def test_size_mismatch_names_files(tmp_path: Path) -> None:
    make_pst900(tmp_path, {"train": ["a"]})
    bad = tmp_path / "train" / "thermal" / "a.png"
    write_png(bad, np.zeros((9, 12), np.uint8))
    with pytest.raises(ValueError, match="differ in size") as err:
        PST900(tmp_path)[0]
    assert str(bad) in str(err.value) and "9x12" in str(err.value) and "8x12" in str(err.value)


def test_label_size_mismatch_names_file(tmp_path: Path) -> None:
    make_mfnet(tmp_path, {"train": ["1D"]})
    bad = tmp_path / "labels" / "1D.png"
    write_png(bad, np.zeros((8, 13), np.uint8))
    with pytest.raises(ValueError, match=re.escape(str(bad))):
        MFNet(tmp_path)[0]


def test_wrong_channel_count_names_file(tmp_path: Path) -> None:
    make_mfnet(tmp_path, {"train": ["1D"]})
    bad = tmp_path / "images" / "1D.png"
    write_png(bad, np.zeros((8, 12, 3), np.uint8))  # RGB only, thermal missing
    with pytest.raises(ValueError, match="expected 4 channel") as err:
        MFNet(tmp_path)[0]
    assert str(bad) in str(err.value) and "found 3" in str(err.value)


def test_wrong_dtype_names_file(tmp_path: Path) -> None:
    make_whu_scenes(tmp_path / "src", ["s"], h=16, w=16)
    tile_whu_opt_sar(tmp_path / "src", tmp_path / "tiles", tile_size=16, fractions=(1, 0, 0), progress=False)
    bad = tmp_path / "tiles" / "lbl" / "s_00_00.tif"
    write_tif(bad, np.zeros((16, 16), np.float32))
    with pytest.raises(ValueError, match="float32") as err:
        WHUOptSar(tmp_path / "tiles")[0]
    assert str(bad) in str(err.value)
    # float SAR cannot be scaled by its dtype maximum; per_image can
    write_tif(bad, np.zeros((16, 16), np.uint8))
    sar = tmp_path / "tiles" / "sar" / "s_00_00.tif"
    write_tif(sar, np.linspace(-20, 5, 256, dtype=np.float32).reshape(16, 16))
    with pytest.raises(ValueError, match=re.escape(str(sar))):
        WHUOptSar(tmp_path / "tiles")[0]
    aux = WHUOptSar(tmp_path / "tiles", sar_normalization="per_image")[0]["aux"]
    assert float(aux.min()) == 0.0 and float(aux.max()) == 1.0


@pytest.mark.parametrize(
    "builder,label_path,bad_values",
    [
        ("nyudv2", "Label/a.png", [41, 77]),
        ("mfnet", "labels/a.png", [9]),
        ("pst900", "train/labels/a.png", [5, 200]),
    ],
)
def test_out_of_range_labels_name_file_and_values(tmp_path: Path, builder: str, label_path: str,
                                                   bad_values: list[int]) -> None:
    if builder == "nyudv2":
        make_nyudv2(tmp_path, {"train": ["a"]})
    elif builder == "mfnet":
        make_mfnet(tmp_path, {"train": ["a"]})
    else:
        make_pst900(tmp_path, {"train": ["a"]})
    label = np.zeros((8, 12), np.uint8)
    label[0, : len(bad_values)] = bad_values
    label[1, 0] = 255  # the ignore value itself is fine
    write_png(tmp_path / label_path, label)
    with pytest.raises(ValueError) as err:
        DATASETS[builder](tmp_path, "train")[0]
    message = str(err.value)
    assert str(tmp_path / label_path) in message and str(bad_values) in message


def test_whu_label_not_multiple_of_ten(tmp_path: Path) -> None:
    make_whu_scenes(tmp_path / "src", ["s"], h=16, w=16)
    tile_whu_opt_sar(tmp_path / "src", tmp_path / "tiles", tile_size=16, fractions=(1, 0, 0), progress=False)
    bad = tmp_path / "tiles" / "lbl" / "s_00_00.tif"
    label = np.full((16, 16), 20, np.uint8)
    label[3, 3] = 15
    write_tif(bad, label)
    with pytest.raises(ValueError, match=r"values \[15\]") as err:
        WHUOptSar(tmp_path / "tiles")[0]
    assert str(bad) in str(err.value)


def test_invalid_options() -> None:
    with pytest.raises(ValueError, match="aux"):
        NYUDv2("/nonexistent", aux="lidar")
    with pytest.raises(ValueError, match="thermal_normalization"):
        MFNet("/nonexistent", thermal_normalization="zscore")
    with pytest.raises(ValueError, match="depth_max_mm"):
        NYUDv2("/nonexistent", depth_max_mm=0)
