"""``--dataset folder``: a user's own RGB-X data, from the layout to a reloadable adapter."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from datasets_helpers import make_folder, write_png, write_tif
from gopt_adapter import read_adapter_file
from gopt_adapter.cli.commands import main
from gopt_adapter.data import FolderDataset, get_dataset
from gopt_adapter.data.transforms import RandomCrop
from gopt_adapter.cli.commands import build_train_parser
from gopt_adapter.train.run_config import load_run_config

KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}
TRAIN = ["--set", f"backbone_kwargs={json.dumps(KWARGS)}", "--set", "train.epochs=1", "--set", "train.batch_size=4",
         "--device", "cpu", "--no-progress"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_weights(path, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **KWARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


# ----------------------------------------------------------------------------- reading
@pytest.mark.parametrize("aux, channels", [("depth16", 1), ("thermal8", 1), ("npy3", 3), ("tif2", 2)])
def test_reads_each_aux_format_scaled_per_image(tmp_path, aux, channels):
    written = make_folder(tmp_path, {"train": 2, "val": 1}, h=20, w=28, aux=aux)
    dataset = get_dataset("folder", tmp_path, "train")
    assert isinstance(dataset, FolderDataset) and len(dataset) == 2
    assert dataset.class_names == ("floor", "wall", "table") and dataset.aux_channels == channels
    assert dataset.common_size == (20, 28)
    sample = dataset[1]
    raw = written["train_001"]
    raw_aux = raw["aux"].reshape(20, 28, channels).astype(np.float64)
    expected = (raw_aux - raw_aux.min()) / (raw_aux.max() - raw_aux.min())  # per-image min-max, all channels
    assert sample["aux"].shape == (channels, 20, 28)
    np.testing.assert_allclose(sample["aux"].numpy().transpose(1, 2, 0), expected, atol=1e-6)
    np.testing.assert_allclose(sample["rgb"].numpy().transpose(1, 2, 0), raw["rgb"] / 255.0, atol=1e-6)
    assert torch.equal(sample["label"], torch.from_numpy(raw["label"].astype(np.int64)))


def test_fixed_scaling_divides_by_aux_max_or_the_dtype_maximum(tmp_path):
    written = make_folder(tmp_path, {"train": 1}, h=8, w=8, aux="depth16")
    raw = written["train_000"]["aux"].astype(np.float64)
    by_mm = get_dataset("folder", tmp_path, "train", aux_normalization="fixed", aux_max=10000)[0]["aux"][0]
    np.testing.assert_allclose(by_mm.numpy(), np.clip(raw / 10000, 0, 1), atol=1e-6)
    by_dtype = get_dataset("folder", tmp_path, "train", aux_normalization="fixed")[0]["aux"][0]
    np.testing.assert_allclose(by_dtype.numpy(), raw / 65535, atol=1e-6)
    with pytest.raises(ValueError, match="needs aux_normalization='fixed'"):
        get_dataset("folder", tmp_path, "train", aux_max=10000)


def test_sizes_that_vary_have_no_common_size(tmp_path):
    make_folder(tmp_path, {"train": 1}, h=16, w=16)
    make_folder(tmp_path / "more", {"train": 1}, h=24, w=16, seed=1)
    for kind in ("rgb", "aux", "label"):
        shutil.move(tmp_path / "more" / "train" / kind / "train_000.png", tmp_path / "train" / kind / "other.png")
    assert get_dataset("folder", tmp_path, "train").common_size is None


# ----------------------------------------------------------------------------- bad input
def _break(root, case):
    split = root / "train"
    if case == "no_aux":
        (split / "aux" / "train_001.png").unlink()
        return "aux image not found", split / "aux" / "train_001.png"
    if case == "no_label":
        (split / "label" / "train_002.png").unlink()
        return "label image not found", split / "label" / "train_002.png"
    if case == "label_without_rgb":
        shutil.copy(split / "label" / "train_000.png", split / "label" / "lost.png")
        return "RGB image not found for", split / "label" / "lost.png"
    if case == "size":
        write_png(split / "aux" / "train_003.png", np.zeros((16, 20), np.uint16))
        return "differ in size", split / "aux" / "train_003.png"
    if case == "label_value":
        label = np.zeros((32, 48), np.uint8)
        label[5, 5] = 7  # 3 classes: neither a class id nor 255
        write_png(split / "label" / "train_002.png", label)
        return "values [7] are outside the class range", split / "label" / "train_002.png"
    if case == "label_16bit":
        write_png(split / "label" / "train_002.png", np.zeros((32, 48), np.uint16))
        return "expected 8-bit class ids", split / "label" / "train_002.png"
    if case == "aux_channels":
        (split / "aux" / "train_003.png").unlink()
        write_tif(split / "aux" / "train_003.tif", np.zeros((32, 48, 2), np.uint16))
        return "has 2 channel(s) but", split / "aux" / "train_003.tif"
    if case == "no_classes":
        (root / "classes.txt").unlink()
        return "class list not found", root / "classes.txt"
    if case == "blank_class":
        (root / "classes.txt").write_text("floor\n\ntable\n")
        return "line 2 is blank", root / "classes.txt"
    if case == "no_val_split":
        shutil.rmtree(root / "val")
        return "split folder not found", root / "val"
    if case == "undecodable":
        (split / "rgb" / "train_001.png").write_bytes(b"not a png")
        return "cannot decode", split / "rgb" / "train_001.png"
    raise ValueError(case)


CASES = ["no_aux", "no_label", "label_without_rgb", "size", "label_value", "label_16bit", "aux_channels",
         "no_classes", "blank_class", "no_val_split", "undecodable"]


@pytest.mark.parametrize("case", CASES)
def test_bad_folder_is_one_error_line_naming_the_file_before_training(tmp_path, capsys, case):
    root = tmp_path / "data"
    make_folder(root, {"train": 4, "val": 1})
    message, path = _break(root, case)
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(root), "--random-init", "--out", str(out), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err and str(path) in err, err
    assert not out.exists()  # nothing trained, nothing written


# ----------------------------------------------------------------------------- recipe
def test_crop_defaults_to_the_common_size_and_preprocessing_follows_the_options(tmp_path):
    from gopt_adapter.train import run as recipe

    make_folder(tmp_path, {"train": 4, "val": 1}, h=24, w=40)

    def built(*extra):
        args = build_train_parser().parse_args(["--dataset", "folder", "--root", str(tmp_path), "--random-init", *extra])
        return recipe.build_datasets(load_run_config(args))

    def crop(train_set):
        return next(t for t in train_set.transform.transforms if isinstance(t, RandomCrop)).size

    train_set, _ = built()
    assert crop(train_set) == (24, 40)
    assert crop(built("--set", "transforms.crop_size=[16, 16]")[0]) == (16, 16)
    make_folder(tmp_path / "more", {"train": 1}, h=24, w=24, seed=1)
    for kind in ("rgb", "aux", "label"):
        shutil.move(tmp_path / "more" / "train" / kind / "train_000.png", tmp_path / "train" / kind / "square.png")
    assert crop(built()[0]) == (512, 512)  # sizes differ: the documented default

    from gopt_adapter.preprocessing import dataset_preprocessing

    _, val_set = built()
    assert dataset_preprocessing(val_set).to_dict()["aux_scale"] == "per_image"
    _, val_set = built("--set", "dataset_options.aux_normalization=fixed", "--set", "dataset_options.aux_max=10000")
    assert dataset_preprocessing(val_set).to_dict()["aux_max"] == 10000.0


def test_train_then_inspect_predict_eval_with_only_the_weights(tmp_path, capsys, monkeypatch):
    """The adapter file carries the timm name, kwargs, class names and preprocessing: predict and
    eval need only --weights, and other weights are still refused."""
    root = tmp_path / "data"
    make_folder(root, {"train": 4, "val": 2}, classes=("sky", "road", "car"))
    weights = tiny_weights(tmp_path / "vit.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(root), "--weights", str(weights),
                 "--out", str(out), *TRAIN]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["backbone_init"] == "weights" and record["class_names"] == ["sky", "road", "car"]
    file = read_adapter_file(out / "adapter.safetensors")
    assert file.class_names == ("sky", "road", "car")
    # gopt train builds every backbone that takes it with dynamic_img_pad; the file says so for the rebuild
    assert (file.backbone_name, file.backbone_kwargs) == ("vit_base_patch16_224", {**KWARGS, "dynamic_img_pad": True})
    assert file.preprocessing.aux_scale == "per_image"
    capsys.readouterr()

    assert main(["inspect", str(out / "adapter.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "3: sky, road, car" in text and "vit_base_patch16_224" in text

    legends = []
    import gopt_adapter.cli.predict as predict_module

    real = predict_module.write_prediction
    monkeypatch.setattr(predict_module, "write_prediction",
                        lambda out_dir, pair, label, names, *a: legends.append(list(names)) or real(out_dir, pair,
                                                                                                   label, names, *a))
    pair = [str(root / "val" / "rgb" / "val_000.png"), str(root / "val" / "aux" / "val_000.png")]
    assert main(["predict", "--adapter", str(out / "adapter.safetensors"), "--weights", str(weights), *pair,
                 "-o", str(tmp_path / "pred"), "--no-progress"]) == 0
    assert legends == [["sky", "road", "car"]]
    with Image.open(tmp_path / "pred" / "val_000_label.png") as label:
        assert label.size == (48, 32) and max(np.unique(np.array(label))) < 3

    capsys.readouterr()
    assert main(["eval", "--dataset", "folder", "--root", str(root), "--adapter", str(out / "adapter.safetensors"),
                 "--weights", str(weights), "--device", "cpu", "--no-progress"]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["miou"] == pytest.approx(record["metrics"]["miou"])  # same backbone, adapter and split

    other = tiny_weights(tmp_path / "other.safetensors", seed=5)
    assert main(["predict", "--adapter", str(out / "adapter.safetensors"), "--weights", str(other), *pair,
                 "-o", str(tmp_path / "pred2")]) == 2
    assert "trained on other backbone weights" in capsys.readouterr().err


def test_the_conversion_example_in_the_docs_makes_a_readable_folder(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    from datasets_helpers import write_jpg

    text = (Path(__file__).resolve().parents[1] / "docs" / "datasets.md").read_text()
    section = text[text.index("### Your own data: the folder layout"):text.index("### NYUDv2")]
    (block,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(block.strip().splitlines()) == 6  # an import line and five lines of conversion
    source = tmp_path / "my_rgbd"
    rng = np.random.default_rng(0)
    for i in range(6):
        write_jpg(source / "images" / f"{i:04d}.jpg", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
        write_png(source / "depth" / f"{i:04d}.png", rng.integers(0, 60000, (24, 32), dtype=np.uint16))
        write_png(source / "masks" / f"{i:04d}.png", rng.integers(0, 3, (24, 32), dtype=np.uint8))
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace('"/data/my_rgbd"', repr(str(source))), "datasets.md", "exec"), {})
    train, val = get_dataset("folder", "my_data", "train"), get_dataset("folder", "my_data", "val")
    assert (len(train), len(val)) == (4, 2) and train.class_names == ("background", "chair", "table")
    assert train[0]["label"].max() < 3


def test_gopt_train_without_a_backbone_choice_names_the_three_flags(tmp_path, capsys):
    make_folder(tmp_path / "data", {"train": 4, "val": 1})
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(tmp_path / "data"), "--out", str(out), *TRAIN]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exactly one of --weights FILE, --pretrained or --random-init" in err
    assert not out.exists()


def test_upper_case_suffixes_are_read_like_lower_case_ones(tmp_path):
    """The layout's suffixes match case-insensitively for every folder, aux and label included."""
    make_folder(tmp_path, {"train": 2})
    for path in sorted((tmp_path / "train").glob("*/train_000.png")):
        path.rename(path.with_suffix(".PNG"))
    dataset = get_dataset("folder", tmp_path, "train")
    assert len(dataset) == 2 and dataset.samples[0].label.name == "train_000.PNG"
    assert dataset[0]["label"].shape == (32, 48)
