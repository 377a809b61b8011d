"""The training and evaluation recipe: one variant on one dataset, written to ``results.json``.

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
diverges: :class:`~gopt_adapter.engine.NonFiniteError`); ``--resume``
continues an interrupted run from its last checkpoint, or re-reports a finished one. GoPT
variants leave their adapter file (``adapter.safetensors``, with the dataset's preprocessing,
class names and the backbone's timm name and kwargs, so ``gopt predict`` / ``gopt eval`` need
only ``--weights``); baselines leave their trained tensors (``trained.safetensors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import timm
import torch

from .adapter import GoptAdapter
from .backbone import BackboneSpec, create_backbone
from .baselines import VARIANTS, build_variant
from .calibration import calibrate_missing_mode
from .datasets import DATASETS, get_dataset
from .engine import (
    CheckpointError,
    NonFiniteError,
    TrainConfig,
    Trainer,
    default_device,
    init_distributed,
    json_safe,
    seed_everything,
    shutdown_distributed,
    trainable_state_dict,
)
from .files import atomic_write_bytes, write_tensors
from .losses import count_labels, enet_class_weights
from .model import save_adapter
from .parameters import count_parameters
from .preprocessing import dataset_preprocessing
from .transforms import NormalizeConfig, TrainTransformConfig, build_transforms, default_train_config

ADAPTER_NAME = "adapter.safetensors"  # GoPT variants: the adapter file, with its preprocessing
TRAINED_NAME = "trained.safetensors"  # baselines: their trainable tensors, by state-dict name
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # .pth/.pt/.bin are read with weights_only=True
INIT_FLAGS = "--weights FILE, --pretrained or --random-init"
_TEXT_SETTINGS = ("dataset", "variant", "backbone", "train_split", "val_split", "out")
_OPTIONAL_TEXT_SETTINGS = ("root", "weights")
_BOOL_SETTINGS = ("pretrained", "random_init")
_GROUP_SETTINGS = ("backbone_kwargs", "dataset_options", "val_options", "transforms", "variant_options", "train")
#: Default evaluation split per dataset (the others evaluate on "test").
_VAL_SPLITS = {"synthetic": "val", "folder": "val"}


class UsageError(Exception):
    """A bad command line or input: reported in one line, before any work."""


@dataclass
class RunConfig:
    """One experiment: dataset, backbone, variant and optimisation settings."""

    dataset: str
    variant: str = "gopt"
    root: str | None = None
    backbone: str = "vit_base_patch16_224.mae"
    weights: str | None = None
    pretrained: bool = False  # timm's own download (where the hub is reachable)
    random_init: bool = False  # train on a randomly initialised backbone, on purpose
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    val_options: dict[str, Any] = field(default_factory=dict)
    transforms: dict[str, Any] = field(default_factory=dict)
    variant_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_split: str = "train"
    val_split: str = "test"
    out: str = "runs/default"

    @property
    def backbone_init(self) -> str:
        """Where the backbone's weights come from: ``"weights"``, ``"pretrained"`` or ``"random_init"``."""
        return "weights" if self.weights else "pretrained" if self.pretrained else "random_init"


def config_path(dataset: str) -> Path:
    """The packaged settings file of ``dataset`` (``gopt_adapter/configs/<dataset>.json``)."""
    return Path(str(resources.files("gopt_adapter").joinpath("configs", f"{dataset}.json")))


def build_parser(prog: str = "gopt train") -> argparse.ArgumentParser:
    """The flags of one experiment (``gopt train`` and ``python -m benchmarks.run``)."""
    parser = argparse.ArgumentParser(prog=prog, description=__doc__,
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
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress output (default: live bars on a terminal, else a line every log_every steps)")
    return parser


def parse_args(argv=None, prog: str = "gopt train") -> argparse.Namespace:
    return build_parser(prog).parse_args(argv)


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """Config file, then the flags, then ``--set`` overrides; validated."""
    dataset = args.dataset.lower().replace("-", "_")
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {sorted(DATASETS)}")
    path = Path(args.config) if getattr(args, "config", None) else config_path(dataset)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"config file {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise UsageError(f"config file {path} must hold a JSON object of settings")
    raw["dataset"] = dataset
    for key in ("root", "variant", "backbone", "out", "train_split", "val_split"):
        if getattr(args, key, None) is not None:
            raw[key] = getattr(args, key)
    flags = {"weights": getattr(args, "weights", None), "pretrained": getattr(args, "pretrained", False),
             "random_init": getattr(args, "random_init", False)}
    if any(flags.values()):  # the command line chooses the backbone's weights over the config file
        raw.update(flags)
    for item in getattr(args, "set", []):
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # bare strings are fine: --set dataset_options.mode=thermal
        target = raw
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {item!r}: {parent!r} is {target!r}, not a group of settings")
        target[leaf] = parsed
    if raw["dataset"] != dataset:
        raise UsageError(f"--set dataset={raw['dataset']!r}: choose the dataset with --dataset")
    if dataset in _VAL_SPLITS:
        raw.setdefault("val_split", _VAL_SPLITS[dataset])
    raw.setdefault("out", f"runs/{dataset}_{raw.get('variant', 'gopt')}")
    if getattr(args, "no_progress", False):
        raw.setdefault("train", {})
        if isinstance(raw["train"], dict):
            raw["train"]["progress"] = False
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise UsageError(f"unknown settings {unknown} in {path} or --set; valid: {sorted(known)}")
    _check_setting_types(raw)
    try:
        raw["train"] = TrainConfig(**raw.get("train", {}))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid train settings: {exc}") from None
    config = RunConfig(**raw)
    if config.variant not in VARIANTS:
        raise UsageError(f"unknown variant {config.variant!r}; choose one of {sorted(VARIANTS)}")
    if dataset != "synthetic":
        if not config.root:
            raise UsageError(f"--root is required for {dataset}: the folder of your copy of the dataset")
        if not Path(config.root).is_dir():
            raise UsageError(f"dataset root {config.root} does not exist or is not a folder")
    check_weights_file(config.weights)
    return config


def check_backbone_init(config: RunConfig) -> None:
    """Exactly one source of backbone weights: no run trains on a random backbone by accident."""
    chosen = [flag for flag, on in (("--weights", bool(config.weights)), ("--pretrained", config.pretrained),
                                    ("--random-init", config.random_init)) if on]
    if len(chosen) != 1:
        given = f" (got {' and '.join(chosen)})" if chosen else ""
        raise UsageError(f"choose the backbone's weights with exactly one of {INIT_FLAGS}{given}")


def check_weights_file(weights: str | None) -> None:
    """A local weights file that exists and has a format that loads without pickled code."""
    if not weights:
        return
    if not Path(weights).is_file():
        raise UsageError(f"weights file {weights} not found")
    if Path(weights).suffix.lower() not in WEIGHT_SUFFIXES:
        raise UsageError(f"weights file {weights}: expected a {', '.join(WEIGHT_SUFFIXES[:-1])} or "
                         f"{WEIGHT_SUFFIXES[-1]} file (the backbone's state dict)")


def _check_setting_types(raw: dict[str, Any]) -> None:
    """Text settings must be strings and groups JSON objects (a wrong type would fail deep inside)."""
    for key in _TEXT_SETTINGS + _OPTIONAL_TEXT_SETTINGS:
        if key in raw and not isinstance(raw[key], str) and not (key in _OPTIONAL_TEXT_SETTINGS and raw[key] is None):
            raise UsageError(f"setting {key} must be a string, got {raw[key]!r}")
    for key in _BOOL_SETTINGS:
        if key in raw and not isinstance(raw[key], bool):
            raise UsageError(f"setting {key} must be true or false, got {raw[key]!r}")
    for key in _GROUP_SETTINGS:
        if key in raw and not isinstance(raw[key], dict):
            raise UsageError(f"setting {key} must be a JSON object of settings, got {raw[key]!r}")


def build_backbone(config: RunConfig) -> torch.nn.Module:
    """The timm backbone with the user's weights, ready for dense prediction at any size: built
    with ``dynamic_img_pad=True`` where the model takes it and ``backbone_kwargs`` leaves it
    unset, so that a patch size that does not divide the images (14 and 480x640) needs no flag;
    the adapter file records it, so ``gopt predict`` / ``gopt eval`` rebuild the same model."""
    try:
        model = create_backbone(config.backbone, config.weights, config.backbone_kwargs, pretrained=config.pretrained,
                                pad_images=True)
    except RuntimeError as exc:  # state-dict mismatch
        if not config.weights:
            raise UsageError(f"cannot create backbone {config.backbone!r}: {str(exc).splitlines()[0]}") from None
        raise UsageError(f"weights {config.weights} do not fit backbone {config.backbone}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise UsageError(f"cannot create backbone {config.backbone!r}: {exc}") from None
    try:
        spec = BackboneSpec.from_model(model)  # token stride of plain and hybrid ViTs alike
    except TypeError as exc:
        raise UsageError(str(exc)) from None
    if spec.patch_size[0] % 2 and not spec.dynamic_img_pad:
        raise UsageError(f"{config.backbone} has patch size {spec.patch_size}: add --set "
                         "backbone_kwargs.dynamic_img_pad=true")
    return model


def report_normalize(name: str, defaults: dict[str, Any], normalize: NormalizeConfig) -> None:
    """One stderr line when the backbone's pretraining, not the library's ImageNet default, set
    the RGB mean/std the run uses, so that the change of inputs is never silent."""
    library = NormalizeConfig()
    taken = {key: value for key, value in defaults.get("normalize", {}).items()
             if getattr(normalize, key) == value != getattr(library, key)}
    if taken:
        values = ", ".join(f"{key} {value}" for key, value in taken.items())
        print(f"backbone {name}: {values} from its pretrained_cfg (override with --set "
              "transforms.normalize.rgb_mean=[...])", file=sys.stderr)


def report_padding(name: str, spec: BackboneSpec, size: tuple[int, int]) -> None:
    """One stderr line when the backbone pads inputs of ``size`` (the training crop) to its patch
    grid, so that a run on zero-padded borders is never a surprise."""
    (ph, pw), (height, width) = spec.patch_size, size
    if spec.dynamic_img_pad and (height % ph or width % pw):
        patch = f"{ph}" if ph == pw else f"{ph}x{pw}"
        print(f"backbone {name}: patch {patch} does not divide the {height}x{width} training crop; padding "
              "bottom/right as timm's dynamic_img_pad", file=sys.stderr)


def backbone_transform_defaults(config: RunConfig, model: torch.nn.Module) -> dict[str, Any]:
    """``transforms`` settings the backbone implies: the RGB mean/std of its pretraining (timm's
    ``pretrained_cfg``; CLIP, SigLIP and EVA-CLIP are not ImageNet-normalised). None for
    ``--random-init``: a backbone pretrained on nothing keeps the library's default."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if config.random_init or mean is None or std is None or len(mean) != 3 or len(std) != 3:
        return {}
    return {"normalize": {"rgb_mean": tuple(mean), "rgb_std": tuple(std)}}


def build_transform_config(config: RunConfig, train_set=None, defaults: dict[str, Any] | None = None) -> TrainTransformConfig:
    """The dataset's usual training transforms with ``defaults`` (the backbone's mean/std, or
    an adapter's recorded preprocessing) and then ``config.transforms`` applied; within
    ``normalize`` key by key, so a user's ``aux_mean`` keeps the backbone's ``rgb_mean``.

    A dataset whose images all share one size (``train_set.common_size``, the folder reader)
    trains at that size unless ``transforms.crop_size`` is set.
    """
    defaults = defaults or {}
    options = {**defaults, **config.transforms}
    valid = [f.name for f in dataclasses.fields(TrainTransformConfig)]
    common_size = getattr(train_set, "common_size", None)
    if "crop_size" not in options and common_size is not None:
        options["crop_size"] = tuple(common_size)
    try:
        if "normalize" in options:
            if not isinstance(options["normalize"], dict):
                raise TypeError("normalize must be an object such as {\"aux_mean\": [0.5], \"aux_std\": [0.5]}")
            options["normalize"] = NormalizeConfig(**{**defaults.get("normalize", {}), **options["normalize"]})
        return default_train_config(config.dataset, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid transforms settings {config.transforms}: {exc} (keys: {valid})") from None


def build_datasets(config: RunConfig, defaults: dict[str, Any] | None = None):
    """Train and val sets with their transforms (:func:`build_transform_config`, ``defaults``
    included); one sample of each is read (RNG untouched) to catch bad files and settings now
    (the folder reader checks every file when it is built)."""
    try:
        train_set = get_dataset(config.dataset, root=config.root, split=config.train_split, **config.dataset_options)
        val_set = get_dataset(config.dataset, root=config.root, split=config.val_split,
                              **{**config.dataset_options, **config.val_options})
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot read {config.dataset}: {exc}") from None
    if train_set.aux_channels != val_set.aux_channels or tuple(train_set.class_names) != tuple(val_set.class_names):
        raise UsageError(f"{config.dataset} splits {config.train_split!r} and {config.val_split!r} differ: "
                         f"{train_set.aux_channels} vs {val_set.aux_channels} aux channel(s), "
                         f"{len(train_set.class_names)} vs {len(val_set.class_names)} classes")
    transforms = build_transform_config(config, train_set, defaults)
    train_set.transform = build_transforms(config.dataset, True, transforms)
    val_set.transform = build_transforms(config.dataset, False, transforms)
    for split, dataset in ((config.train_split, train_set), (config.val_split, val_set)):
        if len(dataset) == 0:
            raise UsageError(f"{config.dataset} split {split!r} has no samples")
        try:
            with torch.random.fork_rng(devices=[]):  # the random transforms must not shift the run's RNG
                dataset[0]
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot read sample 0 of {config.dataset} split {split!r}: {exc}") from None
    return train_set, val_set


def training_class_weights(train_set, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pixels of each class in the training labels and ENet's weights from them (loss
    ``ce_weighted``, :mod:`gopt_adapter.losses`): one pass over the labels as stored, before
    any transform, so no random crop biases them and no RNG is drawn."""
    try:
        labels = (train_set.load_label(index) for index in range(len(train_set)))
        counts = count_labels(labels, num_classes, train_set.ignore_index)
        return counts, enet_class_weights(counts)
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot weight the classes for loss ce_weighted: {exc}") from None


def hardware(device: torch.device) -> dict[str, Any]:
    info = {"device": str(device), "cpu": platform.processor() or platform.machine(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "timm": timm.__version__}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def resolve_device(name: str | None, ctx) -> torch.device:
    """``--device`` checked against this machine (default: this rank's GPU when there is one)."""
    if not name:
        return default_device(ctx)
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


def single_class_warning(metrics: dict[str, Any], class_names: list[str]) -> str | None:
    """The one-line warning for a model that predicts a single class on every evaluated pixel
    (a collapsed run: its mIoU may still look plausible on an imbalanced split), else ``None``."""
    pixels = metrics.get("predicted_pixels")
    if metrics.get("predicted_classes") != 1 or not pixels:  # also: metrics of a checkpoint without them
        return None
    only = next(index for index, count in enumerate(pixels) if count)
    return (f"warning: the trained model predicts only class {only} ({class_names[only]!r}) on all "
            f"{metrics['total']:,} validation pixels; check the labels and the class balance, or lower the "
            "learning rate")


def run(config: RunConfig, resume: bool = False, device: str | None = None) -> dict[str, Any]:
    """Trains and evaluates; returns (and on rank 0 writes) the results record.

    Raises :class:`UsageError` for bad inputs and :class:`~gopt_adapter.engine.NonFiniteError`
    when the training diverges (then nothing but the log and the last epoch's checkpoint is
    left in ``config.out``); warns on stderr when the model predicts one class everywhere.
    """
    check_backbone_init(config)
    ctx = init_distributed()
    seed_everything(config.train.seed)  # random-init backbones and adapter inits are reproducible
    target = resolve_device(device, ctx)
    backbone = build_backbone(config)  # first: its pretraining sets the default RGB mean/std
    defaults = backbone_transform_defaults(config, backbone)
    train_set, val_set = build_datasets(config, defaults)
    transforms = build_transform_config(config, train_set, defaults)
    report_normalize(config.backbone, defaults, transforms.normalize)
    report_padding(config.backbone, BackboneSpec.from_model(backbone), transforms.crop_size)
    num_classes = len(train_set.class_names)
    try:
        model = build_variant(config.variant, backbone, train_set.aux_channels, num_classes, **config.variant_options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build variant {config.variant}: {exc}") from None
    preprocessing = dataset_preprocessing(val_set)  # how raw files became the inputs; gopt predict repeats it
    is_gopt = type(model.adapter) is GoptAdapter  # baselines share the segmenter, not the adapter file format
    if is_gopt:
        model.adapter.preprocessing = preprocessing
        model.adapter.class_names = tuple(train_set.class_names)  # gopt inspect / predict show them
    params = count_parameters(model)
    counts = class_weights = None
    if config.train.loss == "ce_weighted":
        counts, class_weights = training_class_weights(train_set, num_classes)
        if ctx.is_main:
            shown = ", ".join(f"{name} {w:.2f}" for name, w in zip(train_set.class_names, class_weights.tolist()))
            print(f"class weights (ENet, from {int(counts.sum()):,} training pixels): {shown}", file=sys.stderr)
    try:
        trainer = Trainer(model, train_set, num_classes, config.train, config.out, val_set=val_set, device=target,
                          ctx=ctx, class_weights=class_weights)
    except ValueError as exc:  # batch size vs processes and data size, nothing to train
        raise UsageError(str(exc)) from None
    try:
        metrics = trainer.fit(resume=resume)
    except CheckpointError as exc:  # raised while resuming, before any training
        raise UsageError(str(exc)) from None
    finally:
        trainer.close()
    warning = single_class_warning(metrics, list(train_set.class_names))
    if warning and ctx.is_main:
        print(warning, file=sys.stderr)
    calibration = None
    if is_gopt and model.config.has_missing_mode and ctx.is_main:  # only the main process saves the adapter
        report = calibrate_missing_mode(model, train_set)
        calibration = {"pixels": report.pixels, "missing_logit_bias": report.bias.tolist()}
        print(report.summary(), file=sys.stderr)
    record = json_safe({  # standard JSON: NaN (a class never seen) becomes null
        "config": {**dataclasses.asdict(config), "train": dataclasses.asdict(config.train)},
        "backbone_init": config.backbone_init,  # weights, pretrained or random_init
        "metrics": metrics,
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "epochs_completed": trainer.epoch,
        # summed over the sessions of a resumed run (up to each one's last checkpoint)
        "wall_time_s": trainer.wall_seconds,
        "train_images_per_s": trainer.train_images / trainer.train_seconds if trainer.train_seconds > 0 else None,
        "nonfinite_steps": trainer.nonfinite_steps,  # optimizer steps skipped for a NaN/inf loss or gradient
        "hardware": hardware(target),
        "world_size": ctx.world_size,
        "class_names": list(train_set.class_names),
        "preprocessing": preprocessing.to_dict(),
        "missing_mode_calibration": calibration,  # None: the adapter has no aux-missing mode
        # loss ce_weighted: the training pixels per class and the weights computed from them; else None
        "class_weights": None if class_weights is None else {"pixels": counts.tolist(),
                                                              "weights": class_weights.tolist()},
    })
    if ctx.is_main:
        out = Path(config.out)
        if is_gopt:
            save_adapter(model, out / ADAPTER_NAME)
        else:  # what a baseline trained (head, aux branch, and the backbone where it trains)
            write_tensors(out / TRAINED_NAME, trainable_state_dict(model))
        write_results(out, record)
    return record


def write_results(folder: str | Path, record: dict[str, Any]) -> Path:
    """``folder/results.json`` (what ``gopt train`` and ``gopt eval --out`` write): ``record`` as
    standard JSON, NaN as null, written atomically; returns its path."""
    path = Path(folder) / "results.json"
    atomic_write_bytes(path, (json.dumps(json_safe(record), indent=2, allow_nan=False) + "\n").encode())
    return path


def main(argv=None, prog: str = "gopt train") -> int:
    """Parses, validates, trains and evaluates; a bad input or a diverged run ends in one
    ``error:`` line, status 2."""
    args = parse_args(argv, prog)
    try:
        config = load_run_config(args)
        record = run(config, resume=args.resume, device=args.device)
    except (UsageError, NonFiniteError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    metrics = record["metrics"]
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}, indent=None))
    return 0
