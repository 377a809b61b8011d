"""The ``gopt`` command line: help, inspect, predict on real image files, errors, train + eval."""

import argparse
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
from gopt_adapter.cli import commands as cli
from gopt_adapter.train import run as recipe
from gopt_adapter.cli.commands import main
from gopt_adapter.cli.visualize import class_palette, colormap
from model_helpers import nan_logits, with_logits

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


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


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
                                          "--allow-backbone-mismatch", "--rgb-mean", "--aux-std", "--window")),
                             ("eval", ("--dataset", "--adapter", "--split", "--window", "--tta", "--scales", "--flip",
                                       "--out", "--show-dir", "--show-worst")),
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
def test_predict_a_folder_of_pairs(files, tmp_path, capsys, monkeypatch):
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
    captured = capsys.readouterr()
    assert "\r" not in captured.err and captured.out.count("_panel.png") == 2  # not a terminal: lines, no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(args) == 0
    assert "predict" in capsys.readouterr().err  # on a terminal: the progress bar

    out = tmp_path / "mfnet_out"  # a folder without rgb/: every image is a 4-channel MFNet image
    assert main(predict_args(files, out=out, extra=["--pairs-dir", str(MFNET.parent)])) == 0
    assert {p.name for p in out.iterdir()} == {f"{s}_{k}.png" for s in ("01234N", "01477D") for k in ("label", "panel")}


def test_predict_class_names_from_a_dataset(files, tmp_path):
    from gopt_adapter.cli.predict import resolve_class_names

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
    from gopt_adapter.cli.commands import CliError

    with pytest.raises(CliError):
        main([*args, "--debug"])


@needs_fixtures
def test_the_advice_follows_the_error_type_not_its_wording(files, tmp_path, capsys, monkeypatch):
    """Every error of the library reworded (``errors.GoptError.__str__``, and the finding a
    weights mismatch carries): the CLI's exit codes and advice do not change, because it maps
    exception types, not messages, to advice."""
    from gopt_adapter import errors

    typed = {  # each raises its own errors.GoptError subclass
        **{case: args for case, (args, _) in error_cases(files, tmp_path).items()
           if case in ("unreadable", "size_mismatch", "other_backbone", "other_weights", "not_an_adapter")},
        "no_adapter_file": ["inspect", str(tmp_path / "absent.safetensors")],
        "no_such_device": predict_args(files, RGBD_RGB, RGBD_DEPTH, out=tmp_path / "o", extra=["--device", "cuda:7"]),
        "train_usage": ["train", "--dataset", "synthetic", "--set", "train.epochs=-1"],
    }

    def run(args):
        code = main(args)
        return code, capsys.readouterr().err.strip()

    as_worded = {case: run(args) for case, args in typed.items()}
    monkeypatch.setattr(errors.GoptError, "__str__", lambda self: "reworded")
    keep_init = errors.WeightsMismatchError.__init__

    def reworded_finding(self, what):
        keep_init(self, what)
        self.what = "reworded"

    monkeypatch.setattr(errors.WeightsMismatchError, "__init__", reworded_finding)
    for case, args in typed.items():
        code, err = run(args)
        assert code == as_worded[case][0] == 2, (case, err)
        assert err.startswith("error: reworded. "), (case, err)
        advice = err.removeprefix("error: reworded. ")
        assert advice and not advice.startswith("Run with --debug"), (case, err)  # a typed advice, not the fallback
        assert as_worded[case][1].endswith(advice), (case, as_worded[case][1], advice)


@needs_fixtures
def test_allow_backbone_mismatch(files, tmp_path):
    out = tmp_path / "o"
    args = predict_args(files, RGBD_RGB, RGBD_DEPTH, out=out, adapter=files["other_weights"],
                        extra=["--allow-backbone-mismatch"])
    assert main(args) == 0
    check_outputs(out, "sample_rgb", (424, 512))


@needs_fixtures
def test_console_script_error_and_debug_traceback(files, tmp_path):
    """The installed ``gopt`` script: one line and exit 2; with --debug (in process) the exception
    itself, so that Python prints its traceback."""
    args, message = error_cases(files, tmp_path)["size_mismatch"]
    script = shutil.which("gopt")
    command = [script] if script else [sys.executable, "-m", "gopt_adapter.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*command, *args], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr
    assert "Traceback" not in result.stderr
    with pytest.raises(cli.CliError):
        main(["--debug", *args])


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


def test_a_diverging_run_ends_in_one_error_line_and_writes_no_adapter(tmp_path, capsys, monkeypatch):
    """NonFiniteError is a RuntimeError, yet gopt train reports it as an error to act on (status
    2), not as a bug (status 1)."""
    monkeypatch.setattr(recipe, "build_variant", with_logits(recipe.build_variant, nan_logits))
    out = tmp_path / "run"
    assert main(["train", *SMALL, "--set", "train.max_nonfinite_steps=1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("warning: step 1 (epoch 1): non-finite gradients of adapters.default.")
    assert len(err) == 2 and err[1].startswith("error: training stopped at step 1 (epoch 1): 1 optimizer steps in a row")
    assert "no checkpoint was written" in err[1] and "unexpected" not in err[1]
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]


# ----------------------------------------------------------------------------- colour maps
def test_palette_and_colour_maps():
    palette = class_palette(256)
    assert len({tuple(c) for c in palette}) == 256 and tuple(palette[1]) == (128, 0, 0)
    for name in ("viridis", "inferno", "gray"):
        table = colormap(name)
        assert table.shape == (256, 3) and table.dtype == np.uint8
    luminance = colormap("viridis").astype(float) @ np.array([0.299, 0.587, 0.114])
    assert (np.diff(luminance) >= -0.5).all()  # perceptual: lightness rises monotonically


# ----------------------------------------------------------------------------- every option documented
def test_every_option_has_help():
    from gopt_adapter.cli.commands import build_parser

    def walk(parser, prefix):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    yield from walk(sub, f"{prefix} {name}")
            else:
                yield prefix, action

    missing = [f"{where} {'/'.join(a.option_strings) or a.dest}" for where, a in walk(build_parser(), "gopt")
               if not (a.help or "").strip()]
    assert missing == []


# ----------------------------------------------------------------------------- stored preprocessing
NYU_LIKE = dict(aux_max=10_000.0, aux_mean=(0.2,), aux_std=(0.3,))


def save_with_preprocessing(files, path):
    """The module's adapter saved again with a NYUDv2-like preprocessing (same weights)."""
    from gopt_adapter import Preprocessing
    from gopt_adapter.preprocessing import NormalizeConfig

    adapter = files["segmenter"].adapter
    adapter.preprocessing = Preprocessing(aux_max=NYU_LIKE["aux_max"], normalize=NormalizeConfig(
        aux_mean=NYU_LIKE["aux_mean"], aux_std=NYU_LIKE["aux_std"]))
    try:
        save_adapter(files["segmenter"], path)
    finally:
        adapter.preprocessing = None
    return path


@pytest.fixture(scope="module")
def depth_pair(tmp_path_factory):
    """An RGB PNG and a 16-bit millimetre depth PNG (0..10 m) of 48x64 pixels."""
    tmp = tmp_path_factory.mktemp("pair")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(tmp / "room.png")
    Image.fromarray(rng.integers(0, 10_001, (48, 64)).astype(np.uint16)).save(tmp / "room_depth.png")
    return tmp / "room.png", tmp / "room_depth.png"


def test_inspect_shows_stored_preprocessing(files, capsys):
    stored = save_with_preprocessing(files, files["tmp"] / "nyu_like.safetensors")
    assert main(["inspect", str(stored)]) == 0
    text = capsys.readouterr().out
    assert "preprocessing            stored; gopt predict applies it" in text
    for line in ("aux_scale  fixed", "aux_max    10000", "aux_mean   (0.2,)", "aux_std    (0.3,)",
                 "rgb_mean   (0.485, 0.456, 0.406)"):
        assert f"  {line}" in text, line
    assert main(["inspect", "--json", str(stored)]) == 0
    assert json.loads(capsys.readouterr().out)["preprocessing"] == {
        "aux_scale": "fixed", "aux_max": 10000.0,
        "normalize": {"rgb_mean": [0.485, 0.456, 0.406], "rgb_std": [0.229, 0.224, 0.225],
                      "aux_mean": [0.2], "aux_std": [0.3]}}
    assert main(["inspect", str(files["adapter"])]) == 0
    assert "preprocessing            not stored; gopt predict uses the defaults" in capsys.readouterr().out
    assert main(["inspect", "--json", str(files["adapter"])]) == 0
    assert json.loads(capsys.readouterr().out)["preprocessing"] is None


def test_predict_applies_the_stored_preprocessing(files, depth_pair, tmp_path, capsys):
    """16-bit depth with a stored aux_max 10000 and aux mean/std 0.2/0.3 predicts exactly what the
    same weights predict with those values as flags; flags override stored values, and a clip
    (aux_max 2000 on depths of 0-10 m) changes the prediction. (The defaults, depth / 65535 and
    mean/std 0.5, differ from the stored values by a gain and an offset only, which GoPT's
    scene-normalised aux tokens do not see: docs/method.md, reading 2.) stderr says which is used."""
    stored = save_with_preprocessing(files, tmp_path / "nyu_like.safetensors")
    flags = ["--aux-max", "10000", "--aux-mean", "0.2", "--aux-std", "0.3"]
    defaults = ["--aux-max", "65535", "--aux-mean", "0.5", "--aux-std", "0.5"]

    def labels(name, adapter, extra=()):
        out = tmp_path / name
        assert main(predict_args(files, *depth_pair, out=out, adapter=adapter, extra=list(extra))) == 0
        err = capsys.readouterr().err
        return np.array(Image.open(out / "room_label.png")), err

    from_file, err = labels("stored", stored)
    assert "preprocessing (stored with the adapter): aux fixed / 10000;" in err and "aux mean (0.2,)" in err
    from_flags, err = labels("flags", files["adapter"], flags)
    assert "(defaults: the adapter stores none; overridden by --aux-max, --aux-mean, --aux-std)" in err
    default, err = labels("default", files["adapter"])
    assert "(defaults: the adapter stores none): aux fixed / dtype max;" in err
    overridden, err = labels("overridden", stored, defaults)
    assert "(stored with the adapter; overridden by --aux-max, --aux-mean, --aux-std)" in err
    clipped, _ = labels("clipped", stored, ["--aux-max", "2000"])  # beyond 2 m every depth reads 1
    assert np.array_equal(from_file, from_flags)
    assert not np.array_equal(from_file, clipped)
    assert np.array_equal(overridden, default)


@needs_fixtures
def test_predict_mfnet_png_given_as_rgb_and_aux(files, tmp_path):
    """A 4-channel MFNet PNG given as both RGB and AUX is split like the same file given alone."""
    alone, both = tmp_path / "alone", tmp_path / "both"
    assert main(predict_args(files, MFNET, out=alone)) == 0
    assert main(predict_args(files, MFNET, MFNET, out=both)) == 0
    label = check_outputs(both, "01234N", (480, 640))
    assert np.array_equal(label, np.array(Image.open(alone / "01234N_label.png")))


# ----------------------------------------------------------------------------- every error is one line
def assert_one_line_error(capsys, *fragments):
    """stderr ends with one ``error:`` line holding every fragment; before it at most the
    preprocessing note of gopt predict, no traceback."""
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: ") and all(line.startswith("preprocessing (") for line in lines[:-1]), err
    assert all(fragment in lines[-1] for fragment in fragments), err
    assert "Traceback" not in err
    return lines[-1]


def test_output_path_errors_are_one_line(files, depth_pair, tmp_path, capsys):
    """-o naming an existing file, or a folder below a file (an OSError from mkdir), is one line, status 2."""
    existing = tmp_path / "taken.txt"
    existing.write_text("not a folder")
    assert main(predict_args(files, *depth_pair, out=existing)) == 2
    assert_one_line_error(capsys, f"-o {existing} is an existing file")
    assert main(predict_args(files, *depth_pair, out=existing / "sub")) == 2
    assert_one_line_error(capsys, str(existing / "sub"), "Not a directory")
    with pytest.raises(NotADirectoryError):
        main([*predict_args(files, *depth_pair, out=existing / "sub"), "--debug"])


def test_fixed_size_backbone_and_other_image_size_is_one_line(depth_pair, tmp_path, capsys):
    """A Beit (fixed 64x64 input) runs on 64x64 images; on the 48x64 pair the error is one line."""
    from gopt_adapter.backbone import create_backbone

    kwargs = dict(TINY)
    adapter = tmp_path / "beit.safetensors"
    make_adapter(adapter, create_backbone("beit_base_patch16_224", None, kwargs))
    args = ["predict", "--backbone", "beit_base_patch16_224", "--backbone-kwargs", json.dumps(kwargs),
            "--adapter", str(adapter), "--allow-backbone-mismatch", "--no-progress"]
    square = tmp_path / "square.png"
    Image.fromarray(np.zeros((64, 64, 4), dtype=np.uint8)).save(square)
    assert main([*args, str(square), "-o", str(tmp_path / "ok")]) == 0
    capsys.readouterr()
    assert main([*args, *map(str, depth_pair), "-o", str(tmp_path / "o")]) == 2
    assert_one_line_error(capsys, "fixed input size (64, 64), got (48, 64)", str(depth_pair[0]))


def test_a_bug_is_one_line_naming_it_and_debug_shows_it(files, depth_pair, tmp_path, capsys, monkeypatch):
    import gopt_adapter.cli.predict as predict

    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(predict, "predict_labels", broken)
    args = predict_args(files, *depth_pair, out=tmp_path / "o")
    assert main(args) == 1
    line = assert_one_line_error(capsys, "unexpected KeyError: 'boom'", "test_cli.py", "--debug", "bug")
    assert "in broken" in line
    with pytest.raises(KeyError, match="boom"):
        main([*args, "--debug"])


def test_any_value_or_os_error_is_one_line_without_traceback(files, depth_pair, tmp_path, capsys, monkeypatch):
    """Expected error types raised anywhere (here: while writing the outputs) are one line, status 2."""
    import gopt_adapter.cli.predict as predict

    for error in (ValueError("palette has\n3 colours"), OSError("disk full")):
        def failing(*args, **kwargs):
            raise error

        monkeypatch.setattr(predict, "write_prediction", failing)
        assert main(predict_args(files, *depth_pair, out=tmp_path / "o")) == 2
        assert_one_line_error(capsys, " ".join(str(error).split()), "--debug")


# ------------------------------------------------------------------- RGB without aux
@needs_fixtures
def test_predict_rgb_alone_uses_the_missing_mode_and_says_so(files, tmp_path, capsys):
    """One 3-channel image: the adapter's aux-missing mode, announced on stderr; the label equals
    segmenter(rgb, None) of the same adapter, computed here from the image itself."""
    from gopt_adapter.cli.predict import read_pair
    from gopt_adapter.preprocessing import NormalizeConfig

    segmenter = apply_gopt(tiny_vit(), 1, NUM_CLASSES, hidden_dim=8, head_channels=16, aux_dropout=0.2)
    torch.manual_seed(3)
    with torch.no_grad():
        for param in segmenter.adapter.parameters():
            param.add_(torch.randn_like(param) * 0.5)
    save_adapter(segmenter, tmp_path / "robust.safetensors")
    out = tmp_path / "out"
    assert main(predict_args(files, RGBD_RGB, out=out, adapter=tmp_path / "robust.safetensors")) == 0
    assert f"no aux image for {RGBD_RGB}: using the adapter's aux-missing mode" in capsys.readouterr().err
    label = check_outputs(out, "sample_rgb", (424, 512))
    pair = read_pair(RGBD_RGB, None)
    norm = NormalizeConfig()
    rgb = (torch.from_numpy(pair.rgb.transpose(2, 0, 1))[None] - torch.tensor(norm.rgb_mean).view(1, 3, 1, 1)) \
        / torch.tensor(norm.rgb_std).view(1, 3, 1, 1)
    rgb = torch.nn.functional.pad(rgb, (0, -512 % 16, 0, -424 % 16))
    with torch.no_grad():
        expected = segmenter.eval()(rgb, None)[0, :, :424, :512].argmax(0).numpy()
    assert np.array_equal(label, expected)


@needs_fixtures
def test_predict_rgb_alone_with_an_adapter_without_the_mode_is_one_error_line(files, tmp_path, capsys):
    assert main(predict_args(files, RGBD_RGB, out=tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "no aux-missing mode" in err and "\n" not in err
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- eval: TTA, results.json, show-dir
@pytest.fixture(scope="module")
def synthetic_adapter(tmp_path_factory):
    """A GoPT adapter of the tiny synthetic world of ``SMALL``, trained for one epoch."""
    out = tmp_path_factory.mktemp("synthetic") / "run"
    assert main(["train", *SMALL, "--set", "train.epochs=1", "--out", str(out)]) == 0
    return str(out / "adapter.safetensors")


EVAL = ["eval", "--dataset", "synthetic", "--device", "cpu", "--no-progress", *DATA]


def last_json_line(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_eval_tta_at_scale_1_reproduces_plain_eval_and_results_json_keeps_both(synthetic_adapter, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main([*EVAL, "--adapter", synthetic_adapter]) == 0
    plain = last_json_line(capsys)
    assert main([*EVAL, "--adapter", synthetic_adapter, "--tta", "--scales", "1", "--out", str(out)]) == 0
    printed = last_json_line(capsys)
    assert printed["tta"] == {k: v for k, v in printed.items() if k != "tta"} == plain
    record = json.loads((out / "results.json").read_text())
    assert record["tta"]["metrics"] == record["metrics"]  # every metric, per class, and the confusion matrix
    assert (record["tta"]["scales"], record["tta"]["flip"], record["images"]) == ([1.0], False, 2)

    show = tmp_path / "show"
    assert main([*EVAL, "--adapter", synthetic_adapter, "--tta", "--flip", "--out", str(out),
                 "--show-dir", str(show), "--show-worst", "1"]) == 0
    tta = json.loads((out / "results.json").read_text())
    assert tta["metrics"] == record["metrics"] and tta["seconds"] > 0 and tta["tta"]["seconds"] > 0
    assert (tta["tta"]["scales"], tta["tta"]["flip"]) == ([0.75, 1.0, 1.25], True)  # TTAConfig's defaults
    assert " ".join(f"{s:g}" for s in tta["tta"]["scales"]) == cli.TTA_SCALES_HELP  # the --scales help says them
    assert len(list(show.glob("synthetic_depth_val_*.png"))) == 1
    assert (show / "confusion.csv").is_file() and (show / "confusion.png").is_file()


def test_eval_flip_changes_nothing_for_a_flip_equivariant_model(synthetic_adapter, tmp_path, capsys, monkeypatch):
    """The adapter's segmenter replaced by a 1x1 convolution: the mirrored view is the view
    mirrored, so --flip gives plain evaluation's metrics."""
    from gopt_adapter import gopt_segmenter as restore

    torch.manual_seed(0)
    conv = PixelConv(num_classes=8)  # the synthetic depth world's classes
    monkeypatch.setattr(restore, "restore_segmenter", lambda file, *args, **kwargs: (conv, file))
    out = tmp_path / "eval"
    assert main([*EVAL, "--adapter", synthetic_adapter, "--tta", "--scales", "1", "--flip", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["tta"]["flip"] and record["tta"]["metrics"] == record["metrics"]


class PixelConv(torch.nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, num_classes, 1)

    def forward(self, rgb, aux):
        return self.conv(torch.cat([rgb, aux], 1))


@pytest.mark.parametrize("flags", [
    ["--flip"], ["--scales", "1"], ["--tta", "--scales", "0"], ["--tta", "--scales", "1", "1"],
    ["--show-worst", "2"], ["--window", "0"], ["--stride", "8"], ["--window", "16", "--stride", "17"],
    ["--out", "FILE"], ["--show-dir", "FILE"], ["--show-dir", "DIR", "--show-worst", "0"],
])
def test_eval_flag_errors_are_one_line(synthetic_adapter, tmp_path, capsys, flags):
    (tmp_path / "file").write_text("not a folder")
    flags = [{"FILE": str(tmp_path / "file"), "DIR": str(tmp_path / "show")}.get(f, f) for f in flags]
    assert main([*EVAL, "--adapter", synthetic_adapter, *flags]) == 2
    assert_one_line_error(capsys)


def test_predict_by_sliding_window_runs_the_function_eval_runs(files, depth_pair, tmp_path, capsys, monkeypatch):
    from gopt_adapter import inference
    from gopt_adapter.cli.predict import predict_labels, read_pair

    windows, original = [], inference.sliding_window_logits
    monkeypatch.setattr(inference, "sliding_window_logits",
                        lambda model, rgb, aux, k, window, stride=None: windows.append((window, stride)) or
                        original(model, rgb, aux, k, window, stride))
    out = tmp_path / "out"
    assert main(predict_args(files, *depth_pair, out=out, extra=["--window", "32", "--stride", "16"])) == 0
    assert windows == [(32, 16)]
    label = np.array(Image.open(out / "room_label.png"))
    expected = predict_labels(files["segmenter"].eval(), read_pair(*depth_pair), window=32, stride=16)
    assert np.array_equal(label, expected)
    assert main(predict_args(files, *depth_pair, out=out, extra=["--stride", "16"])) == 2
    assert_one_line_error(capsys)
