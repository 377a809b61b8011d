"""The ``gopt`` command line: ``demo``, ``train``, ``eval``, ``predict``, ``inspect``, ``export``, ``bench``.

Errors a person can act on (a missing or undecodable image, RGB and aux of different
sizes, an adapter made for another backbone, a bad option, a training run that diverged,
any ``OSError`` or ``ValueError``) are printed as one line, ``error: <what>. <how to fix>``,
on stderr with exit status 2. Any other exception is a bug: one line naming its type, message
and where it was raised, exit status 1. ``--debug`` (anywhere on the command line) shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ..errors import (
    AdapterError,
    AdapterNotFoundError,
    BackboneBuildError,
    BackboneMismatchError,
    BackboneUnnamedError,
    ImageReadError,
    ImageSizeMismatchError,
    NonFiniteError,
    UsageError,
    WeightsMismatchError,
)
from ..preprocessing import AUX_NORMALIZATIONS

DEVICE_HELP = "cpu, cuda, cuda:1 (default: cuda when available)"
DEBUG_HELP = "show the full traceback of an error (accepted anywhere on the command line)"
TTA_SCALES_HELP = "0.75 1 1.25"  # TTAConfig's default scales (a test checks), named without importing torch


class CliError(Exception):
    """An error reported as one line: what went wrong, then how to fix it."""

    def __init__(self, what: str, fix: str = "") -> None:
        self.what, self.fix = " ".join(str(what).split()).rstrip("."), " ".join(fix.split())
        super().__init__(f"{self.what}. {self.fix}" if self.fix else f"{self.what}.")


# --------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    """``gopt`` and its subcommands: each ``_add_<command>`` adds one; :data:`HANDLERS` runs it."""
    parser = argparse.ArgumentParser(
        prog="gopt", description="GoPT adapters for frozen timm ViTs: train, evaluate, predict, inspect.",
        epilog="Run 'gopt COMMAND --help' for the options of a command. --debug (anywhere): " + DEBUG_HELP + ".")
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_demo, _add_train, _add_eval, _add_predict, _add_inspect, _add_export, _add_bench):
        add(commands)
    return parser


def _add_weights_options(sub: argparse.ArgumentParser) -> None:
    """Rebuilding the adapter's backbone: from the adapter file plus --weights; the rest overrides."""
    sub.add_argument("--weights", help="backbone weights file (.safetensors/.pth) the adapter was trained on; without "
                                       "it the backbone is randomly initialised and the fingerprint check refuses it")
    sub.add_argument("--backbone", help="timm model name (default: the one recorded in the adapter file)")
    sub.add_argument("--allow-backbone-mismatch", action="store_true",
                     help="run even if the backbone weights differ from those the adapter was trained on")


def _add_backbone_kwargs(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--backbone-kwargs", metavar="JSON",
                     help="timm.create_model arguments as a JSON object, replacing those recorded in the adapter file, "
                          "e.g. '{\"embed_dim\":32,\"depth\":2,\"num_heads\":2}'")


def _backbone_kwargs(args: argparse.Namespace) -> dict | None:
    """``--backbone-kwargs`` parsed (``None`` when not given); a bad JSON object is one error line."""
    from .predict import parse_json_kwargs

    try:
        return parse_json_kwargs(args.backbone_kwargs) if args.backbone_kwargs else None
    except ValueError as exc:
        raise CliError(str(exc), f"See gopt {args.command} --help") from None


def _add_window_options(sub: argparse.ArgumentParser) -> None:
    """Sliding-window inference for large images, one implementation for eval and predict
    (mmseg's mode="slide"): the logits of overlapping crops, averaged where they overlap."""
    sub.add_argument("--window", type=int, help="run the model on square crops of this size (pixels), averaging "
                                                "their logits where they overlap (default: the whole image)")
    sub.add_argument("--stride", type=int, help="stride of the sliding window, 1..window (default: the window, "
                                                "no overlap)")


def _add_demo(commands) -> None:
    demo = commands.add_parser("demo", help="train foundation + GoPT on the built-in synthetic world (CPU, minutes)")
    demo.add_argument("--mode", default="depth", choices=("depth", "thermal", "sar"), help="auxiliary modality")
    demo.add_argument("--out", default="runs/demo", help="folder for checkpoints, logs and the adapter")
    demo.add_argument("--seed", type=int, default=0, help="seed of the synthetic data, the backbone and the "
                                                              "adapter initialisation (default 0)")
    demo.add_argument("--no-progress", action="store_true", help="no progress output")


def _add_train(commands) -> None:
    commands.add_parser("train", add_help=False,
                        help="train and evaluate one variant on one dataset, e.g. your own folder of images "
                             "('gopt train --help' lists its options)")


TRAIN_HELP = '''The training and evaluation recipe: one variant on one dataset, written to ``results.json``.

    gopt train --dataset folder --root my_data --backbone vit_base_patch16_224 --weights vit_b.safetensors
    python -m benchmarks.run --dataset nyudv2 --root /data/NYUDepthv2 \\
        --backbone vit_base_patch16_224.mae --weights mae_pretrain_vit_base.pth --variant gopt

Settings come from the package's ``gopt_adapter/configs/<dataset>.json`` (the paper's for the
benchmarks: batch 64, 60 epochs, AdamW, LR 4e-5, polynomial decay, MAE ViT-B; a starting point
for ``folder``) and are overridden by the flags. The backbone's weights must be chosen
explicitly: ``--weights FILE`` (local ``.safetensors`` / ``.pth``), ``--pretrained`` (timm's
download) or ``--random-init`` (from scratch, on purpose; the synthetic config sets it).
Launch with ``torchrun --nproc_per_node N`` for DDP. Every input is checked before any
training starts (a bad one ends in one ``error: ...`` line, exit status 2, as does a run that
diverges: ``NonFiniteError``); ``--resume``
continues an interrupted run from its last checkpoint, or re-reports a finished one. GoPT
variants leave their adapter file (``adapter.safetensors``, with the dataset's preprocessing,
class names and the backbone's timm name and kwargs, so ``gopt predict`` / ``gopt eval`` need
only ``--weights``); baselines leave their trained tensors (``trained.safetensors``).
'''


def build_train_parser(prog: str = "gopt train") -> argparse.ArgumentParser:
    """The flags of one experiment (``gopt train`` and ``python -m benchmarks.run``)."""
    from ..baselines import VARIANTS
    from ..data import DATASETS

    parser = argparse.ArgumentParser(prog=prog, description=TRAIN_HELP,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}")
    parser.add_argument("--root", help="folder of your copy of the dataset (not needed for synthetic)")
    parser.add_argument("--variant", help=f"one of {sorted(VARIANTS)} (default: the config's, else gopt)")
    parser.add_argument("--config", help="JSON settings file (default: the package's configs/<dataset>.json)")
    parser.add_argument("--backbone", help="timm model name (default from the config)")
    init = parser.add_argument_group("backbone weights (exactly one is required)")
    init.add_argument("--weights", help="local weights file of the backbone (.safetensors or .pth)")
    init.add_argument("--pretrained", action="store_true", help="timm's pretrained weights (downloaded from the hub)")
    init.add_argument("--random-init", action="store_true",
                      help="a randomly initialised backbone: training from scratch, on purpose")
    parser.add_argument("--out", help="output folder (default runs/<dataset>_<variant>)")
    parser.add_argument("--train-split", help="split to train on (default train)")
    parser.add_argument("--val-split", help="split to evaluate on (default test; synthetic and folder: val)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, JSON value, dotted key: train.epochs=2, "
                             "dataset_options.mode=\"thermal\", variant_options.hidden_dim=16 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--device", help=DEVICE_HELP)
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: live bars on a terminal, else a line every log_every steps)")
    return parser


def _add_eval(commands) -> None:
    ev = commands.add_parser(
        "eval", help="evaluate a saved adapter on a dataset split and print the metrics",
        description="Evaluates a saved adapter file on a split of a dataset and prints per-class IoU, F1 and the "
                    "metrics (last line: JSON). The dataset and its transforms come from the package's "
                    "configs/<dataset>.json (or --config) and the flags, exactly as 'gopt train' builds them, with "
                    "the mean/std and image scale the adapter file records (--set transforms.* overrides them); "
                    "metrics are at the labels' full resolution. The backbone is rebuilt from the adapter file "
                    "(its timm name and kwargs) plus --weights.")
    ev.add_argument("--dataset", required=True, help="dataset registry name (folder, rgbx, nyudv2, sunrgbd, mfnet, "
                                                     "pst900, whu_opt_sar, synthetic)")
    ev.add_argument("--adapter", required=True, help="adapter file (.safetensors) to evaluate")
    ev.add_argument("--root", help="folder of your copy of the dataset (not needed for synthetic)")
    ev.add_argument("--split", help="split to evaluate (default: the config's val_split: test; synthetic, folder: val)")
    ev.add_argument("--config", help="JSON settings file (default: the package's configs/<dataset>.json)")
    _add_weights_options(ev)
    ev.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a setting as in gopt train, e.g. val_options.length=64 or "
                         "dataset_options.mode=\"thermal\" (repeatable)")
    _add_window_options(ev)
    ev.add_argument("--tta", action="store_true",
                    help="also evaluate with test-time augmentation (mmseg's aug_test, DFormer's --mst): the mean "
                         "softmax of the input at each of --scales (and mirrored with --flip), at the labels' "
                         "resolution; printed and recorded beside the single-scale metrics")
    ev.add_argument("--scales", type=float, nargs="+", metavar="S",
                    help=f"--tta: factors resizing the prepared input (default: {TTA_SCALES_HELP})")
    ev.add_argument("--flip", action="store_true", help="--tta: each scale also mirrored left-right")
    ev.add_argument("--out", metavar="DIR", help="write DIR/results.json: the metrics (with --tta the single-scale "
                                                 "and the TTA metrics side by side), seconds taken and settings")
    ev.add_argument("--show-dir", metavar="DIR",
                    help="write DIR/<stem>.png per image, RGB | aux | prediction | ground truth with wrong pixels "
                         "hatched (mmseg's --show-dir; the TTA prediction with --tta), and DIR/confusion.csv and "
                         "confusion.png, row-normalised")
    ev.add_argument("--show-worst", type=int, metavar="N", help="--show-dir: panels of only the N images of lowest mIoU")
    ev.add_argument("--device", help=DEVICE_HELP)
    ev.add_argument("--no-progress", action="store_true", help="no progress bar")
    ev.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _add_predict(commands) -> None:
    pr = commands.add_parser(
        "predict", help="segment real RGB + auxiliary image pairs; write label PNGs and figure panels",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="""Segments RGB + auxiliary (depth, thermal, SAR) image pairs with a saved adapter on its backbone.

Inputs (PNG, JPEG, TIFF; 8- or 16-bit):
  RGB AUX            two files of the same size
  IMAGE              one 4-channel image, R, G, B + thermal (MFNet); also accepted as RGB and AUX
  RGB                one 3-channel image without aux: the adapter's aux-missing mode (adapters
                     trained with aux_dropout > 0; others are refused)
  --pairs-dir DIR    DIR/rgb/ and DIR/aux/ matched by file stem; or, without rgb/, every image
                     in DIR as a 4-channel MFNet image

Writes OUT/<stem>_label.png (class ids, 8-bit grey for up to 256 classes) and
OUT/<stem>_panel.png: RGB | auxiliary (colour-mapped) | prediction overlay, with a legend.

The auxiliary image is scaled to [0, 1] as the dataset readers do, then both are
normalised, with the preprocessing stored in the adapter file (see gopt inspect) or, for
files without one, the training defaults; --aux-scale, --aux-max, --rgb-mean, --rgb-std,
--aux-mean and --aux-std override single values. The preprocessing used is printed on
stderr. Images whose size is not a multiple of the patch size are zero-padded after
normalisation (i.e. with the mean colour, like the training crop) at the bottom/right;
the logits are cropped back to the input size.""",
        epilog="example: gopt predict --weights mae.pth --adapter nyu.safetensors rgb.png depth.png -o out/")
    pr.add_argument("inputs", nargs="*", metavar="IMAGE", help="RGB AUX, one 4-channel image, or RGB alone")
    pr.add_argument("-o", "--out", required=True, help="output folder (created; must not be a file)")
    pr.add_argument("--pairs-dir", metavar="DIR", help="folder of pairs: rgb/ + aux/ matched by stem (see above)")
    _add_weights_options(pr)
    _add_backbone_kwargs(pr)
    pr.add_argument("--adapter", required=True, help="adapter file (.safetensors) written by save_adapter")
    pr.add_argument("--class-names", metavar="NAMES",
                    help="comma-separated names, or a dataset whose names to use (nyudv2, sunrgbd, mfnet, pst900, "
                         "whu_opt_sar, synthetic[:mode]); default: the names stored in the adapter, else "
                         "'class 0', 'class 1', ...")
    pr.add_argument("--aux-scale", choices=AUX_NORMALIZATIONS,
                    help="fixed: divide by --aux-max and clip; per_image: min-max per image (default: stored in "
                         "the adapter, else fixed)")
    pr.add_argument("--aux-max", type=float,
                    help="divisor for --aux-scale fixed (default: stored in the adapter, else the dtype maximum, "
                         "255 or 65535; 10000 reads millimetre depth like the NYUDv2/SUN RGB-D readers)")
    pr.add_argument("--rgb-mean", metavar="M,M,M", help="RGB mean of the normalisation (default: stored, else ImageNet)")
    pr.add_argument("--rgb-std", metavar="S,S,S", help="RGB std of the normalisation (default: stored, else ImageNet)")
    pr.add_argument("--aux-mean", metavar="M[,M..]",
                    help="aux mean, one value or one per channel (default: stored, else 0.5)")
    pr.add_argument("--aux-std", metavar="S[,S..]", help="aux std, one value or one per channel (default: stored, else 0.5)")
    pr.add_argument("--aux-name", help="title of the auxiliary pane (default: Thermal, Depth or Auxiliary)")
    pr.add_argument("--aux-cmap", choices=("viridis", "inferno", "gray"),
                    help="colour map of the auxiliary pane (default: inferno for thermal, else viridis)")
    pr.add_argument("--legend", choices=("present", "all"), default="present",
                    help="legend of the classes in the prediction (default) or of all classes")
    pr.add_argument("--alpha", type=float, default=0.6, help="opacity of the class colours in the overlay (0-1)")
    _add_window_options(pr)
    pr.add_argument("--device", help=DEVICE_HELP)
    pr.add_argument("--no-progress", action="store_true", help="no progress bar")
    pr.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _add_inspect(commands) -> None:
    ins = commands.add_parser(
        "inspect", help="print an adapter file's config, parameters, dtype, size, preprocessing, backbone "
                        "fingerprint and version",
        description="Prints what an adapter file holds without loading a backbone: its GoPT config, trainable "
                    "parameters, dtype, file size, the preprocessing gopt predict applies, the fingerprint of "
                    "the backbone it was trained on and the library version that wrote it. The file is "
                    "verified (checksum) first.")
    ins.add_argument("file", help="adapter file (.safetensors), or a save_pretrained folder")
    ins.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    ins.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _add_export(commands) -> None:
    ex = commands.add_parser(
        "export", help="export an adapter with its backbone as one ONNX model and check it against PyTorch",
        description="Rebuilds the backbone as gopt predict does (the adapter file's timm model plus --weights), "
                    "wraps it with the adapter and writes the segmenter (eval mode) as ONNX: inputs rgb [B, 3, H, W] "
                    "and aux [B, C, H, W] (with --aux-missing-input also aux_missing [B]; with --rgb-only rgb "
                    "alone), output logits [B, K, H, W], the batch axis dynamic. Before reporting "
                    "success it runs ONNX Runtime (CPU) on a random input and prints the largest difference from "
                    "PyTorch's logits; the file is only written if that is within 1e-4 (--dtype fp16: within 0.5% of the "
                    "largest fp32 logit). Needs the export extra: "
                    "pip install 'gopt-adapter[export]'.",
        epilog="example: gopt export --weights mae.pth --adapter nyu.safetensors --size 480 640 --dynamic-size "
               "-o nyu.onnx")
    ex.add_argument("--adapter", required=True, help="adapter file (.safetensors) written by save_adapter")
    _add_weights_options(ex)
    _add_backbone_kwargs(ex)
    ex.add_argument("--size", type=int, nargs=2, required=True, metavar=("H", "W"),
                    help="image size of the graph (the traced size with --dynamic-size)")
    ex.add_argument("--dynamic-size", action="store_true",
                    help="make H and W dynamic axes (backbones built with dynamic_img_size, as gopt predict does)")
    ex.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    ex.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                    help="precision of the graph (default fp32); fp16 is checked against the fp32 model within 0.5%% "
                         "of the largest logit; bf16 is refused (onnxruntime's CPU provider cannot run it)")
    missing = ex.add_mutually_exclusive_group()
    missing.add_argument("--aux-missing-input", action="store_true",
                         help="a third input aux_missing (bool [B]): flagged samples run in the adapter's aux-missing "
                              "mode (adapters trained with aux_dropout > 0)")
    missing.add_argument("--rgb-only", action="store_true",
                         help="a graph whose only input is rgb, in the adapter's aux-missing mode")
    ex.add_argument("-o", "--out", required=True, help="the .onnx file to write (its folder must exist)")
    ex.add_argument("--debug", action="store_true", help=DEBUG_HELP)


def _add_bench(commands) -> None:
    be = commands.add_parser(
        "bench", help="measure an adapter's cost: parameters, GFLOPs, latency and peak memory",
        description="Measures a segmenter as it runs (eval mode, random inputs of --size and --batch): trainable "
                    "and total parameters, GFLOPs per image (torch.utils.flop_counter: matrix products and "
                    "convolutions, 2 FLOPs per multiply-add), the median latency of a batch over --repeats after "
                    "--warmup forwards, images/s, and peak memory (CUDA: max_memory_allocated; CPU: the process's "
                    "peak RSS). The segmenter is an adapter file on its backbone (--adapter FILE --weights W), or a "
                    "fresh GoPT adapter on a named timm backbone (--backbone NAME --random-init). --vs probe also "
                    "measures the frozen backbone with the adapter's head alone on the same weights, and prints the "
                    "ratios.",
        epilog="example: gopt bench --adapter nyu.safetensors --weights mae.pth --size 480 640 --vs probe")
    be.add_argument("--adapter", help="adapter file (.safetensors) to measure on its backbone")
    _add_weights_options(be)
    be.add_argument("--random-init", action="store_true",
                    help="with --backbone and no --adapter: a randomly initialised backbone and a fresh GoPT adapter")
    _add_backbone_kwargs(be)
    be.add_argument("--aux-channels", type=int, default=1, help="fresh adapter: aux channels (default 1)")
    be.add_argument("--num-classes", type=int, default=40, help="fresh adapter: classes (default 40, NYUDv2's)")
    be.add_argument("--size", type=int, nargs=2, default=(224, 224), metavar=("H", "W"), help="input size (default 224 224)")
    be.add_argument("--batch", type=int, default=1, help="batch of the timed forwards (default 1)")
    be.add_argument("--repeats", type=int, default=10, help="timed forwards; the median is reported (default 10)")
    be.add_argument("--warmup", type=int, default=3, help="untimed forwards first (default 3)")
    be.add_argument("--vs", choices=("probe",), help="also measure this reference and print the ratios")
    be.add_argument("--device", help=DEVICE_HELP)
    be.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    be.add_argument("--debug", action="store_true", help=DEBUG_HELP)


# --------------------------------------------------------------------------- entry
def main(argv: Sequence[str] | None = None) -> int:
    """``gopt [--debug] COMMAND ...``: the exit status of the command (2: an error a person can
    act on, 1: a bug)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":
        return train_main(argv[1:])
    return _guarded(argv, _dispatch)


def _dispatch(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    return HANDLERS[args.command](args)


def train_main(argv: Sequence[str], prog: str = "gopt train") -> int:
    """``gopt train`` (and ``python -m benchmarks.run``, under its own ``prog``): the one entry
    point of a training run from a command line."""
    return _guarded(list(argv), lambda rest: _train(rest, prog))


def _guarded(argv: list[str], command) -> int:
    """Runs ``command(argv without --debug)``; every error ends as one line unless ``--debug``."""
    debug = "--debug" in argv
    try:
        return command([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error ends as one line unless --debug
        if debug:
            raise
        if _expected(exc):
            print(f"error: {_expected_error(exc)}", file=sys.stderr)
            return 2
        print(f"error: {_bug_report(exc)}", file=sys.stderr)
        return 1


def _expected(exc: Exception) -> bool:
    """Errors from the input or the environment (not bugs): reported without a traceback."""
    import torch

    return isinstance(exc, (CliError, OSError, ValueError, MemoryError, torch.OutOfMemoryError))


def _expected_error(exc: Exception) -> CliError:
    if isinstance(exc, CliError):
        return exc
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        target = f"{exc.filename} -> {exc.filename2}" if exc.filename2 else exc.filename
        return CliError(f"{target}: {exc.strerror}", "Check the path and its permissions")
    message = " ".join(str(exc).split()) or type(exc).__name__
    return CliError(message, "Run with --debug for the traceback")


def _bug_report(exc: Exception) -> CliError:
    """One line for an unexpected exception: type, message and the innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" (at {Path(frames[-1].filename).name}:{frames[-1].lineno} in {frames[-1].name})" if frames else ""
    message = " ".join(str(exc).split())
    return CliError(f"unexpected {type(exc).__name__}{': ' + message if message else ''}{where}",
                    "This is a bug in gopt-adapter: run again with --debug for the traceback and report it")


# --------------------------------------------------------------------------- helpers
def _adapter_error(exc: AdapterError, backbone_options: str = "--backbone, --backbone-kwargs and --weights",
                   weights_given: bool = True) -> CliError:
    """The advice for each kind of unusable adapter, chosen by the error's type."""

    if isinstance(exc, BackboneMismatchError):
        return CliError(str(exc), f"Use the {backbone_options} the adapter was trained with")
    if isinstance(exc, WeightsMismatchError):
        first = ("Pass the --weights the adapter was trained on" if weights_given else
                 "No --weights given, so the backbone has random weights: pass the weights file the adapter was "
                 "trained on")
        return CliError(exc.what, f"{first}, or --allow-backbone-mismatch to run anyway (predictions may be poor)")
    if isinstance(exc, AdapterNotFoundError):
        return CliError(str(exc), "Check the adapter path")
    if isinstance(exc, BackboneUnnamedError):
        return CliError(str(exc), "Pass --backbone NAME (and its kwargs) the adapter was trained with")
    return CliError(str(exc), "The file is not a usable GoPT adapter; write it again with gopt_adapter.save_adapter")


def _check_window_flags(args: argparse.Namespace) -> None:
    """--window / --stride of eval and predict, checked before any work."""
    from ..inference import check_window

    try:
        check_window(args.window, args.stride, prefix="--")
    except ValueError as exc:
        raise CliError(str(exc), "Give e.g. --window 512 --stride 384 (a stride within the window)") from None


def _check_folder(path: str | None, flag: str) -> None:
    """An output folder flag: refused when it names an existing file."""
    if path is not None and Path(path).exists() and not Path(path).is_dir():
        raise CliError(f"{flag} {path} is an existing file, not a folder", f"Give a folder for {flag}")


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise CliError(f"{name} {text!r} is not a comma-separated list of numbers",
                       f"write it like {name} 0.5 or {name} 0.485,0.456,0.406") from None


def _device(name: str | None):
    """``--device`` through the library's one resolver; a device this machine lacks is a usage error."""
    from ..train.engine import resolve_device

    try:
        return resolve_device(name)
    except UsageError as exc:
        raise CliError(str(exc), "Use --device cpu, cuda or cuda:N") from None


# --------------------------------------------------------------------------- demo
def _demo(args: argparse.Namespace) -> int:
    from .demo import DemoConfig, run_demo

    result = run_demo(replace(DemoConfig(), mode=args.mode, out=args.out, seed=args.seed),
                      progress=not args.no_progress)
    return 0 if result["reloaded_identical"] else 1


# --------------------------------------------------------------------------- train
def _train(rest: list[str], prog: str = "gopt train") -> int:
    from ..train.engine import shutdown_distributed
    from ..train.run import run
    from ..train.run_config import load_run_config

    try:
        args = build_train_parser(prog).parse_args(rest)
    except SystemExit as exc:  # --help, or a usage error argparse has printed
        if exc.code == 0 and ("-h" in rest or "--help" in rest):
            print(f"\n  --debug               {DEBUG_HELP}")
        return int(exc.code or 0)
    try:
        config = load_run_config(args)
        record = run(config, resume=args.resume, device=args.device)
    except UsageError as exc:
        raise CliError(str(exc), f"See {prog} --help") from None
    except NonFiniteError as exc:  # a RuntimeError, but a diverged run, not a bug: no bug report
        raise CliError(str(exc)) from None
    finally:
        shutdown_distributed()
    print(json.dumps({k: v for k, v in record["metrics"].items() if isinstance(v, float)}))
    print(f"results.json and adapter.safetensors (GoPT variants) in {config.out}", file=sys.stderr)
    return 0


def _backbone_error(exc: FileNotFoundError | BackboneBuildError) -> CliError:
    """The advice for a backbone that cannot be built from --backbone, its kwargs and --weights."""
    if isinstance(exc, FileNotFoundError):
        return CliError(str(exc), "Check the --weights path")
    return CliError(str(exc), "Check --backbone (a timm model name), its kwargs and that --weights belong to that model")


def _restore(args: argparse.Namespace, file, backbone: str | None, backbone_kwargs: dict | None,
             seed: int | None = None, options: str = "--backbone, --backbone-kwargs and --weights"):
    """The adapter's segmenter rebuilt from the file plus ``--weights``, errors as one line."""
    from ..gopt_segmenter import restore_segmenter

    try:
        return restore_segmenter(file, args.weights, backbone, backbone_kwargs, args.allow_backbone_mismatch, seed)
    except (FileNotFoundError, BackboneBuildError) as exc:
        raise _backbone_error(exc) from None
    except AdapterError as exc:
        raise _adapter_error(exc, options, bool(args.weights)) from None
    except TypeError as exc:  # not a ViT GoPT can wrap
        raise CliError(str(exc), "Use a plain ViT backbone (see the supported list)") from None


# --------------------------------------------------------------------------- eval
def _eval(args: argparse.Namespace) -> int:
    import time

    from ..adapter_file import read_adapter_file
    from ..train import run_config
    from ..train.engine import evaluate, seed_everything
    from ..train.run import build_datasets, write_results
    from ..inference import TTAConfig
    from .show import ShowWriter

    _check_window_flags(args)
    if not args.tta and (args.scales is not None or args.flip):
        raise CliError("--scales and --flip choose the views of --tta, which is not given", "Add --tta")
    if args.show_worst is not None and not args.show_dir:
        raise CliError("--show-worst N chooses the panels of --show-dir, which is not given", "Add --show-dir DIR")
    for flag, folder in (("--out", args.out), ("--show-dir", args.show_dir)):
        _check_folder(folder, flag)
    tta = None
    if args.tta:
        tta = TTAConfig(flip=args.flip) if args.scales is None else TTAConfig(tuple(args.scales), args.flip)
    try:
        file = read_adapter_file(args.adapter)
    except AdapterError as exc:
        raise _adapter_error(exc) from None
    device = _device(args.device)
    try:
        dataset_name = run_config.check_dataset(args.dataset)
        settings, source = run_config.read_settings(dataset_name, args.config)
        run_config.apply_flags(settings, root=args.root, backbone=args.backbone, train_split=args.split,
                               val_split=args.split)
        run_config.apply_overrides(settings, args.set)
        config = run_config.run_config(settings, dataset_name, source)
        run_config.check_weights_file(args.weights)
        seed_everything(config.train.seed)
        # the inputs the adapter was trained on (mean/std, image scale) unless --set transforms.* says otherwise
        recorded = file.preprocessing.transform_settings() if file.preprocessing is not None else None
        _, dataset = build_datasets(config, recorded)
    except UsageError as exc:
        raise CliError(str(exc), "See gopt eval --help") from None
    names = list(dataset.class_names)
    show = ShowWriter(args.show_dir, dataset, names, args.show_worst) if args.show_dir else None
    # the adapter's recorded backbone, unless --backbone names one (built with the config's kwargs,
    # as gopt train builds it) or --set gives backbone_kwargs; files that record none use the config's
    named = args.backbone or (None if file.backbone_name else config.backbone)
    kwargs_given = named or any(item.startswith("backbone_kwargs") for item in args.set)
    segmenter, file = _restore(args, file, named, config.backbone_kwargs if kwargs_given else None,
                               seed=config.train.seed,
                               options="--backbone, --weights and backbone_kwargs (--config or --set)")
    num_classes = file.config.num_classes
    if len(names) != num_classes:
        raise CliError(f"the adapter predicts {num_classes} classes but {config.dataset} split {config.val_split!r} "
                       f"has {len(names)}", "evaluate it on the dataset (and options) it was trained for")
    if dataset.aux_channels != file.config.aux_channels:
        raise CliError(f"the adapter takes {file.config.aux_channels} aux channel(s), the dataset gives "
                       f"{dataset.aux_channels}", "set the dataset's aux option (e.g. --set dataset_options.aux=\"hha\")")
    segmenter.to(device)

    def timed_evaluation(views, on_prediction) -> tuple[dict[str, Any], float]:
        started = time.perf_counter()
        metrics = evaluate(segmenter, dataset, num_classes, device, window=args.window, stride=args.stride,
                           amp=config.train.amp, progress=not args.no_progress, tta=views,
                           on_prediction=on_prediction)
        return metrics, time.perf_counter() - started

    # the single-scale pass, then (with --tta) the TTA pass; --show-dir shows the last one
    metrics, seconds = timed_evaluation(None, show if tta is None else None)
    tta_metrics, tta_seconds = timed_evaluation(tta, show) if tta is not None else (None, None)
    width = max(len(n) for n in names)
    fmt = lambda v: "     -" if math.isnan(v) else f"{100 * v:6.2f}"  # noqa: E731
    print(f"{config.dataset} / {config.val_split}: {len(dataset)} images, adapter {args.adapter}")
    print(f"{'class':<{width}}  {'IoU':>6}  {'F1':>6}  {'acc':>6}" + (f"  {'TTA IoU':>7}  {'TTA F1':>7}" if tta else ""))
    for index, name in enumerate(names):
        row = f"{name:<{width}}  " + "  ".join(fmt(metrics[key][index]) for key in ("iou", "f1", "acc"))
        if tta is not None:
            row += "".join(f"  {fmt(tta_metrics[key][index]):>7}" for key in ("iou", "f1"))
        print(row)

    def summary(result: dict[str, Any]) -> str:
        return (f"mIoU {100 * result['miou']:.2f}  mean F1 {100 * result['mean_f1']:.2f}  "
                f"pixel acc {100 * result['pixel_acc']:.2f}  mean acc {100 * result['mean_acc']:.2f}")

    print(f"{summary(metrics)}  ({'single scale, ' if tta else ''}{seconds:.1f} s)")
    if tta is not None:
        print(f"TTA, {tta.describe()}: {summary(tta_metrics)}  (mIoU {100 * (tta_metrics['miou'] - metrics['miou']):+.2f}; "
              f"{tta_seconds:.1f} s, {tta_seconds / seconds:.2f}x the time)")
    if show is not None:
        panels = show.finish((metrics if tta is None else tta_metrics)["confusion"])
        print(f"{len(panels)} panels, confusion.csv and confusion.png in {args.show_dir}", file=sys.stderr)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        path = write_results(args.out, {
            "dataset": config.dataset, "split": config.val_split, "adapter": str(args.adapter), "images": len(dataset),
            "class_names": names, "window": args.window, "stride": args.stride, "metrics": metrics,
            "seconds": seconds, "tta": None if tta is None else {"scales": list(tta.scales), "flip": tta.flip,
                                                                 "metrics": tta_metrics, "seconds": tta_seconds}})
        print(f"wrote {path}", file=sys.stderr)
    scalars = {k: v for k, v in metrics.items() if isinstance(v, float)}
    if tta is not None:
        scalars["tta"] = {k: v for k, v in tta_metrics.items() if isinstance(v, float)}
    print(json.dumps(scalars))
    return 0


# --------------------------------------------------------------------------- predict
def _pair_error(exc: Exception) -> CliError:
    """The advice for an input pair that cannot be read, chosen by the error's type."""

    if isinstance(exc, FileNotFoundError):
        return CliError(str(exc), "Check the path")
    if isinstance(exc, ImageSizeMismatchError):
        return CliError(str(exc), "Give an aligned pair of the same size (resize or crop one of them)")
    if isinstance(exc, ImageReadError):
        return CliError(str(exc), "Give a readable PNG, JPEG or TIFF file")
    return CliError(str(exc), "See gopt predict --help for the accepted inputs")


def _predict(args: argparse.Namespace) -> int:
    from ..adapter_file import read_adapter_file
    from ..train.engine import terminal_progress
    from .predict import (
        find_pairs,
        predict_labels,
        read_pair,
        resolve_class_names,
        write_prediction,
    )

    if args.pairs_dir and args.inputs:
        raise CliError("give either image files or --pairs-dir, not both", "See gopt predict --help")
    if not args.pairs_dir and len(args.inputs) not in (1, 2):
        raise CliError(f"expected RGB AUX, one 4-channel image or --pairs-dir; got {len(args.inputs)} image argument(s)",
                       "See gopt predict --help")
    if not 0.0 <= args.alpha <= 1.0:
        raise CliError(f"--alpha {args.alpha} is outside [0, 1]", "Use e.g. --alpha 0.6")
    _check_window_flags(args)
    _check_folder(args.out, "-o")
    out = Path(args.out)
    try:
        if args.pairs_dir:
            jobs = find_pairs(args.pairs_dir)
        else:
            rgb = Path(args.inputs[0])
            jobs = [(rgb.stem, rgb, Path(args.inputs[1]) if len(args.inputs) == 2 else None)]
        for _, rgb, aux in jobs:
            for path, what in ((rgb, "RGB image"), (aux, "auxiliary image")):
                if path is not None and not path.is_file():
                    raise FileNotFoundError(f"{what} {path} not found")
    except (FileNotFoundError, ValueError) as exc:
        raise _pair_error(exc) from None

    try:
        file = read_adapter_file(args.adapter)
    except AdapterError as exc:
        raise _adapter_error(exc) from None
    config = file.config
    try:
        class_names = resolve_class_names(args.class_names, config.num_classes, file.class_names)
    except ValueError as exc:
        raise CliError(str(exc), f"give {config.num_classes} comma-separated names or the dataset the adapter was "
                                 "trained on") from None
    preprocessing, source = _preprocessing(args, file)
    backbone_kwargs = _backbone_kwargs(args)
    device = _device(args.device)

    def read(rgb_path: Path, aux_path: Path | None):
        try:
            pair = read_pair(rgb_path, aux_path, config.aux_channels, preprocessing.aux_scale, preprocessing.aux_max)
        except (FileNotFoundError, ValueError) as exc:
            raise _pair_error(exc) from None
        if pair.aux is None:  # an RGB image alone
            if not config.has_missing_mode:
                raise CliError(f"{rgb_path} is an RGB image without an aux image, and adapter {args.adapter} has no "
                               "aux-missing mode (it was trained with aux_dropout=0)",
                               "Give the aux image as the second input, or use an adapter trained with aux_dropout > 0")
            print(f"no aux image for {rgb_path}: using the adapter's aux-missing mode", file=sys.stderr)
        return pair

    first = read(*jobs[0][1:])  # a bad input is reported before the backbone is built
    segmenter, _ = _restore(args, file, args.backbone, backbone_kwargs)
    segmenter.to(device)
    out.mkdir(parents=True, exist_ok=True)
    print(f"preprocessing ({source}): {preprocessing.describe()}", file=sys.stderr)

    progress = terminal_progress(None, "predict", len(jobs) > 1 and not args.no_progress, total=len(jobs), unit="pair")
    try:
        for index, (stem, rgb_path, aux_path) in enumerate(jobs):
            pair = first if index == 0 else read(rgb_path, aux_path)
            pair.stem = stem
            try:
                label = predict_labels(segmenter, pair, preprocessing.normalize, device, preprocessing.image_scale,
                                       args.window, args.stride)
            except ValueError as exc:  # e.g. a fixed-size backbone and an image of another size
                raise CliError(f"{rgb_path}: {exc}", "Use images the backbone accepts (see --backbone-kwargs)") from None
            label_path, panel_path = write_prediction(out, pair, label, class_names, args.aux_cmap, args.legend,
                                                      args.alpha, args.aux_name)
            line = f"{stem}: {label_path} {panel_path}"
            if progress is not None:
                progress.write(line, file=sys.stdout)
                progress.update()
            else:
                print(line)
    finally:
        if progress is not None:
            progress.close()
    return 0


_NORMALIZE_FLAGS = {"rgb_mean": "--rgb-mean", "rgb_std": "--rgb-std", "aux_mean": "--aux-mean", "aux_std": "--aux-std"}


def _preprocessing(args: argparse.Namespace, file):
    """The adapter's stored preprocessing (else the defaults) with the flags given applied,
    and where it comes from, in words."""
    from ..preprocessing import Preprocessing, check_aux_channels

    normalize = {name: _floats(getattr(args, name), flag) for name, flag in _NORMALIZE_FLAGS.items()}
    given = [flag for flag, value in (("--aux-scale", args.aux_scale), ("--aux-max", args.aux_max),
                                      *((f, normalize[n]) for n, f in _NORMALIZE_FLAGS.items())) if value is not None]
    stored = file.preprocessing
    try:
        preprocessing = (stored or Preprocessing()).override(args.aux_scale, args.aux_max, **normalize)
        check_aux_channels(preprocessing.normalize, file.config.aux_channels)
    except ValueError as exc:
        raise CliError(str(exc), "Fix the flag, e.g. --aux-max 10000 for millimetre depth; see gopt predict --help") \
            from None
    source = "stored with the adapter" if stored is not None else "defaults: the adapter stores none"
    if given:
        source += f"; overridden by {', '.join(given)}"
    return preprocessing, source


# --------------------------------------------------------------------------- inspect
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


def adapter_summary(path: str | Path) -> dict[str, Any]:
    """What ``gopt inspect`` prints, as a dict (no backbone is loaded)."""
    from ..adapter_file import read_adapter_file
    from ..gopt_segmenter import WEIGHTS_NAME

    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_NAME
    file = read_adapter_file(path)
    params = {n: t for n, t in file.tensors.items() if not n.endswith(_BUFFER_SUFFIXES)}
    buffers = {n: t for n, t in file.tensors.items() if n not in params}
    dtypes = sorted({str(t.dtype).replace("torch.", "") for t in params.values() if t.is_floating_point()})
    depth = file.backbone.get("depth")
    try:
        blocks = list(file.config.prompter_blocks(int(depth))) if depth else None
    except (TypeError, ValueError):
        blocks = None
    return {
        "file": str(path),
        "file_bytes": path.stat().st_size,
        "library_version": file.library_version,
        "dtype": ",".join(dtypes) or "-",
        "trainable_parameters": sum(t.numel() for t in params.values()),
        "tensors": len(file.tensors),
        "buffers": len(buffers),
        "prompter_blocks": blocks,
        "config": file.config.to_dict(),
        "preprocessing": file.preprocessing.to_dict() if file.preprocessing is not None else None,
        "class_names": list(file.class_names) if file.class_names is not None else None,
        "timm_model": file.backbone_name,
        "backbone_kwargs": file.backbone_kwargs,
        "backbone": file.backbone,
    }


def _size(num_bytes: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.2f} {unit}"
    return f"{num_bytes} B"


def _inspect(args: argparse.Namespace) -> int:

    try:
        info = adapter_summary(args.file)
    except AdapterError as exc:
        raise _adapter_error(exc) from None
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    preprocessing = info["preprocessing"]
    kwargs = "(kwargs not recorded)" if info["backbone_kwargs"] is None else json.dumps(info["backbone_kwargs"])
    rows = [
        ("file", info["file"]),
        ("size", f"{info['file_bytes']:,} bytes ({_size(info['file_bytes'])})"),
        ("library version", info["library_version"]),
        ("dtype", info["dtype"]),
        ("trainable parameters", f"{info['trainable_parameters']:,}"),
        ("tensors", f"{info['tensors']} ({info['buffers']} of them BatchNorm statistics, not trained)"),
        ("prompters before blocks", info["prompter_blocks"]),
        ("timm model", "not recorded: give gopt predict --backbone" if info["timm_model"] is None else
         f"{info['timm_model']} {kwargs}"),
        ("classes", "not recorded" if info["class_names"] is None else
         f"{len(info['class_names'])}: {', '.join(info['class_names'])}"),
        ("preprocessing", "stored; gopt predict applies it" if preprocessing is not None else
         "not stored; gopt predict uses the defaults (aux divided by the dtype maximum, ImageNet RGB mean/std, "
         "aux mean/std 0.5)"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    sections = [("config", info["config"])]
    if preprocessing is not None:
        sections.append(("preprocessing", {
            "aux_scale": preprocessing["aux_scale"],
            "aux_max": "dtype maximum" if preprocessing["aux_max"] is None else f"{preprocessing['aux_max']:g}",
            **{key: tuple(value) for key, value in preprocessing["normalize"].items()},
            **({"image_scale": preprocessing["image_scale"]} if "image_scale" in preprocessing else {})}))  # when not 1
    sections.append(("backbone fingerprint", info["backbone"]))
    for title, section in sections:
        print(f"{title}:")
        inner = max(len(k) for k in section)
        for key, value in section.items():
            print(f"  {key:<{inner}}  {value}")
    return 0


# --------------------------------------------------------------------------- export
def _export(args: argparse.Namespace) -> int:
    import os
    import tempfile

    import torch

    from ..adapter_file import read_adapter_file
    from ..export import (
        FP16_RELATIVE_TOLERANCE,
        PARITY_TOLERANCE,
        check_export_dtype,
        check_missing_mode,
        example_inputs,
        export_onnx,
        onnx_max_difference,
        require_module,
    )

    height, width = args.size
    if height < 1 or width < 1:
        raise CliError(f"--size {height} {width} is not a positive image size", "Give H W, e.g. --size 480 640")
    out = Path(args.out)
    if out.is_dir():
        raise CliError(f"-o {out} is a folder", "Give the .onnx file to write, e.g. -o model.onnx")
    if not out.parent.is_dir():
        raise CliError(f"folder {out.parent} of -o {out} does not exist", "Create it first or write elsewhere")
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    try:  # a refused flag before any file is read
        check_export_dtype(dtype)
    except ValueError as exc:
        raise CliError(str(exc), "Give --dtype fp16 or fp32") from None
    try:
        file = read_adapter_file(args.adapter)
    except AdapterError as exc:
        raise _adapter_error(exc) from None
    flag = "--aux-missing-input" if args.aux_missing_input else "--rgb-only" if args.rgb_only else None
    if flag:
        try:
            check_missing_mode(file.config, flag, args.adapter)
        except ValueError as exc:
            raise CliError(str(exc), "Export without the flag, or train with --set variant_options.aux_dropout=0.3") \
                from None
    backbone_kwargs = _backbone_kwargs(args)
    try:
        for module in ("onnx", "onnxscript", "onnxruntime"):  # before any work: the check needs all three
            require_module(module)
    except ImportError as exc:
        raise CliError(str(exc), "Install the export extra") from None
    segmenter, file = _restore(args, file, args.backbone, backbone_kwargs)

    # written next to -o first: a model that fails the check never replaces anything
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".onnx", dir=out.parent)
    os.close(fd)
    os.unlink(tmp)  # export_onnx creates it with the usual mode (mkstemp's is private)
    try:
        export_onnx(segmenter, tmp, (height, width), dynamic_size=args.dynamic_size, opset=args.opset,
                    aux_missing_input=args.aux_missing_input, rgb_only=args.rgb_only, dtype=dtype)
        relative = dtype == torch.float16  # against the fp32 model: relative to its largest logit
        tolerance = FP16_RELATIVE_TOLERANCE if relative else PARITY_TOLERANCE
        ph, pw = segmenter.spec.patch_size
        sizes = [(height, width)] + ([(height + ph, width + 2 * pw)] if args.dynamic_size else [])
        checks = []
        for size in sizes:
            rgb, aux = example_inputs(segmenter, size, batch=3, seed=1)
            flags = torch.tensor([True, False, True]) if args.aux_missing_input else None  # a mixed batch
            difference = onnx_max_difference(tmp, segmenter, rgb, aux, flags, relative=relative)
            checks.append(f"{difference:.2e}{' of the largest logit' if relative else ''} at {size[0]}x{size[1]}")
            if not difference <= tolerance:
                raise CliError(f"ONNX Runtime's logits differ from PyTorch's by up to {difference:.3g}"
                               f"{' of the largest logit' if relative else ''} at {size[0]}x{size[1]} (tolerance "
                               f"{tolerance:g}); nothing was written",
                               "Run with --debug and report it, with the backbone name and torch/onnx versions")
        os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    inputs = f"rgb [B, 3, {'H' if args.dynamic_size else height}, {'W' if args.dynamic_size else width}]"
    if not args.rgb_only:
        inputs += f", aux [B, {file.config.aux_channels}, ...]"
    if args.aux_missing_input:
        inputs += ", aux_missing [B] (bool)"
    print(f"wrote {out} ({_size(out.stat().st_size)}, {args.dtype}): inputs {inputs}, output logits "
          f"[B, {file.config.num_classes}, ...]")
    batch = "batch 3, samples 1 and 3 without aux" if args.aux_missing_input else "batch 3"
    print(f"parity with PyTorch (onnxruntime CPU, {batch}): max |difference| {', '.join(checks)}")
    return 0


# --------------------------------------------------------------------------- bench
def _bench_models(args: argparse.Namespace, backbone_kwargs: dict | None):
    """The segmenter to measure, a builder of a fresh copy of its backbone (for ``--vs``), and
    its adapter's config."""
    from ..adapter_file import read_adapter_file
    from ..gopt_segmenter import apply_gopt, backbone_for_adapter, build_backbone

    if args.adapter:
        try:
            file = read_adapter_file(args.adapter)
        except AdapterError as exc:
            raise _adapter_error(exc) from None
        segmenter, file = _restore(args, file, args.backbone, backbone_kwargs)
        return segmenter, lambda: backbone_for_adapter(file, args.weights, args.backbone, backbone_kwargs), file.config
    if not args.backbone or not (args.random_init or args.weights):
        raise CliError("give --adapter FILE --weights W, or --backbone NAME with --random-init (or --weights)",
                       "See gopt bench --help")
    for name, value in (("--aux-channels", args.aux_channels), ("--num-classes", args.num_classes)):
        if value < 1:
            raise CliError(f"{name} {value} is not a positive count", "See gopt bench --help")

    def build():
        try:
            return build_backbone(args.backbone, args.weights, backbone_kwargs)
        except (FileNotFoundError, BackboneBuildError) as exc:
            raise _backbone_error(exc) from None

    try:
        segmenter = apply_gopt(build(), args.aux_channels, args.num_classes)
    except TypeError as exc:  # not a ViT GoPT can wrap
        raise CliError(str(exc), "Use a ViT backbone (see the supported list)") from None
    return segmenter, build, segmenter.config


def _bench(args: argparse.Namespace) -> int:
    from ..baselines import build_variant
    from .bench import measure, ratios

    height, width = args.size
    for name, value in (("--size", min(height, width)), ("--batch", args.batch), ("--repeats", args.repeats)):
        if value < 1:
            raise CliError(f"{name} must be positive, got {value}", "See gopt bench --help")
    if args.warmup < 0:
        raise CliError(f"--warmup must be >= 0, got {args.warmup}", "See gopt bench --help")
    backbone_kwargs = _backbone_kwargs(args)
    device = _device(args.device)
    segmenter, fresh_backbone, config = _bench_models(args, backbone_kwargs)
    segmenter.spec.check_image_size(height, width)
    settings = dict(size=(height, width), batch=args.batch, aux_channels=config.aux_channels, device=device,
                    repeats=args.repeats, warmup=args.warmup)
    record: dict[str, Any] = {"model": measure(segmenter, **settings), "size": [height, width], "batch": args.batch,
                              "device": str(device), "repeats": args.repeats, "warmup": args.warmup}
    if args.vs == "probe":
        del segmenter
        probe = build_variant("probe", fresh_backbone(), config.aux_channels, config.num_classes, head=config.head,
                              head_channels=config.head_channels)  # the adapter's own head: the ratios are GoPT's
        record["probe"] = measure(probe, **settings)
        record["ratio_vs_probe"] = ratios(record["model"], record["probe"])
    if args.json:
        print(json.dumps(record))
        return 0
    rows = [("model", record["model"])] + ([("probe", record["probe"])] if "probe" in record else [])
    print(f"{height}x{width}, batch {args.batch}, {device}; latency: median of {args.repeats} after {args.warmup} "
          f"warm-up forwards")
    print(f"{'':8s} {'trainable':>12s} {'total':>13s} {'GFLOPs/img':>10s} {'ms/batch':>9s} {'img/s':>8s} "
          f"{'peak MB':>9s}")
    for name, m in rows:
        print(f"{name:8s} {m['trainable_parameters']:>12,} {m['total_parameters']:>13,} {m['gflops_per_image']:>10.3g} "
              f"{m['latency_ms']:>9.1f} {m['images_per_s']:>8.1f} {m['peak_memory_mb']:>9.0f}")
    if "ratio_vs_probe" in record:
        shown = ", ".join(f"{key} {value:.2f}x" for key, value in record["ratio_vs_probe"].items() if value is not None)
        print(f"ratio vs probe: {shown}")
    print(f"peak memory: {record['model']['peak_memory_kind']}")
    return 0


#: What runs each subcommand parsed by :func:`build_parser` (``train`` parses its own flags).
HANDLERS = {"demo": _demo, "eval": _eval, "predict": _predict, "inspect": _inspect, "export": _export,
            "bench": _bench}


