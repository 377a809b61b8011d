"""``--dataset rgbx``: the CMX / DFormer layout (RGB/, any modality folder, Label/, split lists)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from datasets_helpers import make_rgbx, write_png
from gopt_adapter.cli.commands import main
from gopt_adapter.data import RGBXDataset, get_dataset, read_image

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


# ----------------------------------------------------------------------------- reading
def test_reads_the_layout_and_finds_the_one_modality_folder(tmp_path):
    written = make_rgbx(tmp_path, {"train": ["a", "b"], "test": ["c"]}, modality="Thermal", num_classes=4)
    dataset = get_dataset("rgbx", tmp_path, "train", reduce_zero_label=True)
    assert isinstance(dataset, RGBXDataset) and len(dataset) == 2 and dataset.modality == "Thermal"
    assert dataset.class_names == ("class0", "class1", "class2", "class3") and dataset.aux_channels == 1
    assert dataset.common_size == (8, 12)
    sample = dataset[1]
    assert sample["meta"] == {"stem": "b", "size": (8, 12)}
    depth = written["b"]["depth"].astype(np.float64)  # per-image min-max by default, as the folder reader
    np.testing.assert_allclose(sample["aux"][0].numpy(), (depth - depth.min()) / (depth.max() - depth.min()), atol=1e-6)
    rgb = read_image(tmp_path / "RGB" / "b.jpg")  # the JPEG as it decodes
    np.testing.assert_allclose(sample["rgb"].numpy().transpose(1, 2, 0), rgb / 255.0, atol=1e-6)
    fixed = get_dataset("rgbx", tmp_path, "test", reduce_zero_label=True, aux_normalization="fixed", aux_max=10000)
    np.testing.assert_allclose(fixed[0]["aux"][0].numpy(), written["c"]["depth"] / 10000, atol=1e-6)


# raw label of a 2x4 image, and the class ids it stands for, worked out by hand
RAW = np.array([[0, 1, 2, 3], [255, 3, 2, 1]], np.uint8)
REDUCED = [[255, 0, 1, 2], [255, 2, 1, 0]]  # reduce_zero_label: 0 -> ignore, k -> k - 1, 255 stays


@pytest.mark.parametrize("reduce_zero_label, expected", [(True, REDUCED), (False, RAW.tolist())])
def test_reduce_zero_label_maps_0_to_ignore_and_k_to_k_minus_1(tmp_path, reduce_zero_label, expected):
    make_rgbx(tmp_path, {"train": ["a"]}, h=2, w=4, reduce_zero_label=reduce_zero_label)
    write_png(tmp_path / "Label" / "a.png", RAW)
    dataset = get_dataset("rgbx", tmp_path, "train", reduce_zero_label=reduce_zero_label)
    assert dataset.num_classes == (3 if reduce_zero_label else 4)
    assert dataset[0]["label"].tolist() == expected and dataset.load_label(0).tolist() == expected
    assert dataset[0]["label"].dtype == torch.int64


@pytest.mark.parametrize("list_style", ["stem", "name", "path", "pair"])
def test_split_files_name_samples_by_stem_file_name_path_or_pair_in_their_order(tmp_path, list_style):
    make_rgbx(tmp_path, {"train": ["b", "a", "c"]}, list_style=list_style)
    text = (tmp_path / "train.txt").read_text()
    assert {"stem": "b\n", "name": "b.jpg\n", "path": "RGB/b.jpg\n", "pair": "RGB/b.jpg Label/b.png\n"}[list_style] \
        in text
    dataset = get_dataset("rgbx", tmp_path, "train", reduce_zero_label=True)
    assert [files.stem for files in dataset.samples] == ["b", "a", "c"]
    assert [files.label.name for files in dataset.samples] == ["b.png", "a.png", "c.png"]


# ----------------------------------------------------------------------------- bad input
def _break(root, case):
    """Spoils the layout of ``make_rgbx(root, {"train": ["a", "b", "c"]})``; returns the
    dataset options to read it with."""
    options = {"reduce_zero_label": True}
    if case == "no_rgb_folder":
        shutil.rmtree(root / "RGB")
    elif case == "no_label_folder":
        shutil.rmtree(root / "Label")
    elif case == "named_modality_missing":
        options["modality"] = "Thermal"
    elif case == "no_modality_folder":
        shutil.rmtree(root / "Depth")
    elif case == "two_modality_folders":
        shutil.copytree(root / "Depth", root / "HHA")
    elif case == "no_split_file":
        (root / "train.txt").unlink()
    elif case == "empty_split_file":
        (root / "train.txt").write_text("\n")
    elif case == "no_classes":
        (root / "classes.txt").unlink()
    elif case == "listed_without_rgb":
        (root / "train.txt").write_text("a\nb\nc\nghost\n")
    elif case == "listed_without_aux":
        (root / "Depth" / "b.png").unlink()
    elif case == "listed_without_label":
        (root / "Label" / "c.png").unlink()
    elif case == "size":
        write_png(root / "Depth" / "b.png", np.zeros((10, 12), np.uint16))
    elif case == "label_out_of_range":
        write_png(root / "Label" / "a.png", np.full((8, 12), 4, np.uint8))  # 3 classes: raw 0..3 only
    elif case == "label_16bit":
        write_png(root / "Label" / "a.png", np.zeros((8, 12), np.uint16))
    elif case == "aux_channels":
        write_png(root / "Depth" / "c.png", np.zeros((8, 12, 3), np.uint8))
    elif case == "too_many_shifted_classes":
        (root / "classes.txt").write_text("".join(f"c{k}\n" for k in range(255)))  # raw 255 would be a class
    elif case == "modality_not_a_name":
        options["modality"] = ""
    elif case == "reduce_not_a_bool":
        options["reduce_zero_label"] = "yes"
    else:
        raise ValueError(case)
    return options


CASES = {
    "no_rgb_folder": FileNotFoundError, "no_label_folder": FileNotFoundError,
    "named_modality_missing": FileNotFoundError, "no_modality_folder": FileNotFoundError,
    "two_modality_folders": ValueError, "no_split_file": FileNotFoundError, "empty_split_file": FileNotFoundError,
    "no_classes": FileNotFoundError, "listed_without_rgb": FileNotFoundError,
    "listed_without_aux": FileNotFoundError, "listed_without_label": FileNotFoundError, "size": ValueError,
    "label_out_of_range": ValueError, "label_16bit": ValueError, "aux_channels": ValueError,
    "too_many_shifted_classes": ValueError, "modality_not_a_name": ValueError, "reduce_not_a_bool": ValueError,
}


@pytest.mark.parametrize("case", CASES)
def test_each_bad_input_is_refused_when_the_dataset_is_built(tmp_path, case):
    make_rgbx(tmp_path, {"train": ["a", "b", "c"]})
    options = _break(tmp_path, case)
    with pytest.raises(CASES[case]):
        get_dataset("rgbx", tmp_path, "train", **options)


# ----------------------------------------------------------------------------- gopt train / eval
def test_gopt_train_and_eval_read_the_layout_with_the_options_set(tmp_path, capsys):
    from test_folder import TRAIN, tiny_weights

    root = tmp_path / "NYUDepthv2"
    make_rgbx(root, {"train": ["1", "2", "3", "4"], "test": ["5", "6"]}, h=16, w=24, modality="HHA",
              list_style="path")
    shutil.copytree(root / "HHA", root / "Depth")  # two modality folders: the option picks one
    options = ["--set", "dataset_options.modality=HHA", "--set", "dataset_options.reduce_zero_label=true"]
    weights = tiny_weights(tmp_path / "vit.safetensors")
    out = tmp_path / "run"
    assert main(["train", "--dataset", "rgbx", "--root", str(root), "--weights", str(weights), "--out", str(out),
                 *options, *TRAIN]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["class_names"] == ["class0", "class1", "class2"]
    assert record["config"]["dataset_options"] == {"modality": "HHA", "reduce_zero_label": True}
    assert record["config"]["val_split"] == "test" and len(record["metrics"]["f1"]) == 3
    capsys.readouterr()
    assert main(["eval", "--dataset", "rgbx", "--root", str(root), "--adapter", str(out / "adapter.safetensors"),
                 "--weights", str(weights), *options, "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[1].split() == ["class", "IoU", "F1", "acc"]
    metrics = json.loads(printed[-1])
    assert metrics["miou"] == pytest.approx(record["metrics"]["miou"])
    assert metrics["mean_f1"] == pytest.approx(record["metrics"]["mean_f1"])

    (root / "Label" / "2.png").unlink()
    assert main(["train", "--dataset", "rgbx", "--root", str(root), "--weights", str(weights),
                 "--out", str(tmp_path / "bad"), *options, *TRAIN]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "bad").exists()  # one error line, no run
