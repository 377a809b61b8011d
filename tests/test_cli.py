"""The ``gopt`` command line: help, inspect, predict on real image files, errors, train + eval."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from safetensors.torch import save_file

from gopt_adapter import __version__, apply_gopt, count_parameters, save_adapter
from gopt_adapter.cli import main
from gopt_adapter.visualize import class_palette, colormap

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
MFNET = FIXTURES / "mfnet" / "01234N.png"
RGBD_RGB, RGBD_DEPTH = FIXTURES / "rgbd" / "sample_rgb.png", FIXTURES / "rgbd" / "sample_depth.png"
needs_fixtures = pytest.mark.skipif(not MFNET.is_file() or not RGBD_DEPTH.is_file(),
                                    reason="real sample files in ../shared/fixtures are absent")

BACKBONE = "vit_base_patch16_224"
TINY = dict(embed_dim=32, depth=2, num_heads=2, img_size=64)
NUM_CLASSES = 5


def tiny_vit(depth=2, seed=0):
    torch.manual_seed(seed)
    return timm.create_model(BACKBONE, pretrained=False, num_classes=0, dynamic_img_size=True,
                             **{**TINY, "depth": depth}).eval()


def make_adapter(path, backbone, num_classes=NUM_CLASSES, seed=1, dtype=None):
    segmenter = apply_gopt(backbone, 1, num_classes, hidden_dim=8, head_channels=16)
    torch.manual_seed(seed)
    with torch.no_grad():  # move off the identity init so predictions are not constant
        for param in segmenter.adapter.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    save_adapter(segmenter, path, dtype=dtype)
    return segmenter


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads; on a shared 2-core machine they only spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Backbone weights (random, as a safetensors file) and adapters trained 'on' them."""
    tmp = tmp_path_factory.mktemp("cli")
    weights = tmp / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_vit().state_dict().items()}, str(weights))
    segmenter = make_adapter(tmp / "adapter.safetensors", tiny_vit())
    make_adapter(tmp / "deeper.safetensors", tiny_vit(depth=3))
    make_adapter(tmp / "other_weights.safetensors", tiny_vit(seed=7))
    return {"weights": weights, "adapter": tmp / "adapter.safetensors", "deeper": tmp / "deeper.safetensors",
            "other_weights": tmp / "other_weights.safetensors", "segmenter": segmenter, "tmp": tmp}


def predict_args(files, *inputs, out, adapter=None, extra=()):
    return ["predict", "--backbone", BACKBONE, "--weights", str(files["weights"]),
            "--backbone-kwargs", json.dumps(TINY), "--adapter", str(adapter or files["adapter"]),
            "--no-progress", *map(str, inputs), "-o", str(out), *extra]


def check_outputs(out, stem, size, num_classes=NUM_CLASSES):
    label_path, panel_path = out / f"{stem}_label.png", out / f"{stem}_panel.png"
    with Image.open(label_path) as label_image:
        assert label_image.mode == "L" and label_image.size == (size[1], size[0])
        label = np.array(label_image)
    assert label.max() < num_classes
    with Image.open(panel_path) as panel_image:
        panel = np.array(panel_image.convert("RGB"))
    height, width = size
    assert panel.shape[1] > 3 * width and panel.shape[0] > height  # three panes side by side + legend
    # the legend under the panes holds the swatch colour of every predicted class
    legend = panel[height + 30:].reshape(-1, 3)
    for cls in np.unique(label):
        assert (legend == class_palette(num_classes)[cls]).all(1).any(), f"no swatch for class {cls}"
    return label


# ----------------------------------------------------------------------------- help
def test_help_lists_commands_and_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for command in ("demo", "train", "eval", "predict", "inspect", "--debug"):
        assert command in text
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--dataset", "--variant", "--weights", "--set", "--resume", "--device", "--debug"):
        assert option in text
    assert "usage: gopt train" in text and "benchmarks.run [" not in text
    for command, options in (("predict", ("--pairs-dir", "--class-names", "--aux-scale", "--backbone-kwargs",
                                          "--allow-backbone-mismatch", "--rgb-mean", "--aux-std")),
                             ("eval", ("--dataset", "--adapter", "--split", "--window")),
                             ("inspect", ("--json",))):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = capsys.readouterr().out
        assert all(option in text for option in options), command


# ----------------------------------------------------------------------------- inspect
def test_inspect_prints_the_adapter_without_a_backbone(files, capsys):
    path = files["adapter"]
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    segmenter = files["segmenter"]
    trainable = count_parameters(segmenter).trainable
    for expected in (f"{trainable:,}", "float32", f"{path.stat().st_size:,} bytes", __version__,
                     segmenter.backbone_fingerprint()["weights_sha256"], "hidden_dim", "head_channels",
                     "num_classes    5", "embed_dim"):
        assert expected in text, expected
    assert main(["inspect", "--json", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["trainable_parameters"] == trainable
    assert info["file_bytes"] == path.stat().st_size and info["dtype"] == "float32"
    assert info["library_version"] == __version__ and info["config"] == segmenter.config.to_dict()
    assert info["backbone"] == segmenter.backbone_fingerprint() and info["prompter_blocks"] == [0, 1]

    half = files["tmp"] / "half.safetensors"
    save_adapter(segmenter, half, dtype=torch.float16)
    assert main(["inspect", "--json", str(half)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["dtype"] == "float16" and info["trainable_parameters"] == trainable


# ----------------------------------------------------------------------------- predict
@needs_fixtures
def test_predict_mfnet_four_channel_png(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(predict_args(files, MFNET, out=out)) == 0
    check_outputs(out, "01234N", (480, 640))
    assert "01234N_panel.png" in capsys.readouterr().out


@needs_fixtures
def test_predict_rgbd_pair_with_16bit_depth(files, tmp_path):
    out = tmp_path / "out"
    names = "wall,floor,sofa,table,lamp"
    assert main(predict_args(files, RGBD_RGB, RGBD_DEPTH, out=out, extra=["--class-names", names])) == 0
    label = check_outputs(out, "sample_rgb", (424, 512))
    assert len(np.unique(label)) > 1  # a perturbed adapter does not predict one class everywhere
    # per-image scaling and another normalisation run too (the depth fixture spans 0..65535)
    out2 = tmp_path / "out2"
    assert main(predict_args(files, RGBD_RGB, RGBD_DEPTH, out=out2,
                             extra=["--aux-scale", "per_image", "--aux-mean", "0.4", "--aux-std", "0.3",
                                    "--legend", "all"])) == 0
    check_outputs(out2, "sample_rgb", (424, 512))


@needs_fixtures
def test_predict_a_folder_of_pairs(files, tmp_path, capsys):
    pairs = tmp_path / "pairs"
    (pairs / "rgb").mkdir(parents=True)
    (pairs / "aux").mkdir()
    rgb, depth = Image.open(RGBD_RGB), Image.open(RGBD_DEPTH)
    shutil.copy(RGBD_RGB, pairs / "rgb" / "room.png")
    shutil.copy(RGBD_DEPTH, pairs / "aux" / "room.png")
    rgb.resize((80, 60)).save(pairs / "rgb" / "small.jpg")  # JPEG RGB + 16-bit TIFF depth, not patch-divisible
    import tifffile

    tifffile.imwrite(pairs / "aux" / "small.tif", np.array(depth.resize((80, 60), Image.NEAREST)).astype(np.uint16))
    out = tmp_path / "out"
    args = predict_args(files, out=out, extra=["--pairs-dir", str(pairs)])
    args.remove("--no-progress")
    assert main(args) == 0
    check_outputs(out, "room", (424, 512))
    check_outputs(out, "small", (60, 80))
    assert sorted(p.name for p in out.iterdir()) == ["room_label.png", "room_panel.png",
                                                    "small_label.png", "small_panel.png"]
    assert "predict" in capsys.readouterr().err  # the progress bar

    out = tmp_path / "mfnet_out"  # a folder without rgb/: every image is a 4-channel MFNet image
    assert main(predict_args(files, out=out, extra=["--pairs-dir", str(MFNET.parent)])) == 0
    assert {p.name for p in out.iterdir()} == {f"{s}_{k}.png" for s in ("01234N", "01477D") for k in ("label", "panel")}


def test_predict_class_names_from_a_dataset(files, tmp_path):
    from gopt_adapter.predict import resolve_class_names

    assert resolve_class_names("mfnet", 9)[2] == "person" and resolve_class_names("mfnet", 8)[0] == "car"
    assert resolve_class_names("nyudv2", 40)[0] == "wall"
    assert resolve_class_names("synthetic", 7) == resolve_class_names("synthetic:thermal", 7)
    assert resolve_class_names(None, 3) == ["class 0", "class 1", "class 2"]
    with pytest.raises(ValueError, match="has 40 class names, the adapter predicts 5"):
        resolve_class_names("nyudv2", 5)


# ----------------------------------------------------------------------------- errors
def error_cases(files, tmp):
    garbage = tmp / "broken.png"
    garbage.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    small_depth = tmp / "depth_small.png"
    if RGBD_DEPTH.is_file():
        Image.open(RGBD_DEPTH).resize((256, 212), Image.NEAREST).save(small_depth)
    return {
        "unreadable": (predict_args(files, garbage, RGBD_DEPTH, out=tmp / "o"), "cannot decode image"),
        "missing": (predict_args(files, tmp / "nope.png", RGBD_DEPTH, out=tmp / "o"), "not found"),
        "size_mismatch": (predict_args(files, RGBD_RGB, small_depth, out=tmp / "o"), "differ in size"),
        "other_backbone": (predict_args(files, RGBD_RGB, RGBD_DEPTH, out=tmp / "o", adapter=files["deeper"]),
                           "adapter made for another backbone (depth: file 3, backbone 2"),
        "other_weights": (predict_args(files, RGBD_RGB, RGBD_DEPTH, out=tmp / "o", adapter=files["other_weights"]),
                          "--allow-backbone-mismatch"),
        "class_names": (predict_args(files, RGBD_RGB, RGBD_DEPTH, out=tmp / "o", extra=["--class-names", "a,b"]),
                        "has 2 class names, the adapter predicts 5"),
        "not_an_adapter": (["inspect", str(files["weights"])], "not a GoPT adapter"),
    }


@needs_fixtures
@pytest.mark.parametrize("case", ["unreadable", "missing", "size_mismatch", "other_backbone", "other_weights",
                                  "class_names", "not_an_adapter"])
def test_errors_are_one_line(files, tmp_path, capsys, case):
    args, message = error_cases(files, tmp_path)[case]
    assert main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "o").exists()
    from gopt_adapter.cli import CliError

    with pytest.raises(CliError):
        main([*args, "--debug"])


@needs_fixtures
def test_allow_backbone_mismatch(files, tmp_path):
    out = tmp_path / "o"
    args = predict_args(files, RGBD_RGB, RGBD_DEPTH, out=out, adapter=files["other_weights"],
                        extra=["--allow-backbone-mismatch"])
    assert main(args) == 0
    check_outputs(out, "sample_rgb", (424, 512))


@needs_fixtures
def test_console_script_error_and_debug_traceback(files, tmp_path):
    """The installed ``gopt`` script: one line and exit 2; with --debug the traceback."""
    args, message = error_cases(files, tmp_path)["size_mismatch"]
    script = shutil.which("gopt")
    command = [script] if script else [sys.executable, "-m", "gopt_adapter.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    result = subprocess.run([*command, "--debug", *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode != 0 and "Traceback" in result.stderr and "CliError" in result.stderr


# ----------------------------------------------------------------------------- train / eval
DATA = ["--set", "dataset_options.length=8", "--set", "dataset_options.size=32", "--set", "val_options.length=2"]
SMALL = ["--dataset", "synthetic", "--device", "cpu", "--set", "train.progress=false", "--set", "train.batch_size=8",
         "--set", "transforms.crop_size=[32,32]", *DATA]


def test_train_then_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--set", "train.epochs=1", "--out", str(out)]) == 0
    trained = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    adapter = out / "adapter.safetensors"
    assert adapter.is_file()
    assert main(["eval", "--dataset", "synthetic", "--adapter", str(adapter), "--device", "cpu", "--no-progress",
                 *DATA]) == 0
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "picture" in printed  # per-class table with the dataset's names
    metrics = json.loads(printed.strip().splitlines()[-1])
    assert metrics["miou"] == pytest.approx(trained["miou"])  # same backbone, same adapter, same split

    assert main(["train", "--dataset", "kitti"]) == 2
    assert capsys.readouterr().err.startswith("error: unknown dataset 'kitti'")
    assert main(["eval", "--dataset", "synthetic", "--adapter", str(tmp_path / "missing.safetensors")]) == 2
    assert "no such adapter file" in capsys.readouterr().err


# ----------------------------------------------------------------------------- colour maps
def test_palette_and_colour_maps():
    palette = class_palette(256)
    assert len({tuple(c) for c in palette}) == 256 and tuple(palette[1]) == (128, 0, 0)
    for name in ("viridis", "inferno", "gray"):
        table = colormap(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8
    luminance = colormap("viridis").astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance) >= -0.5).all()  # perceptual: lightness rises monotonically
