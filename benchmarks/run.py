"""Train and evaluate one variant on one dataset; writes ``results.json`` into ``--out``.

    python -m benchmarks.run --dataset nyudv2 --root /data/NYUDepthv2 \\
        --backbone vit_base_patch16_224.mae --weights mae_pretrain_vit_base.pth --variant gopt

Settings come from ``benchmarks/configs/<dataset>.json`` (the paper's: batch 64, 60 epochs,
AdamW, LR 4e-5, polynomial decay, MAE ViT-B) and are overridden by the flags. Launch with
``torchrun --nproc_per_node N -m benchmarks.run ...`` for DDP. Every input is checked before
any training starts (a bad one ends in one ``error: ...`` line); ``--resume`` continues an
interrupted run from its last checkpoint, or re-reports a finished one. GoPT variants leave
their adapter file (``adapter.safetensors``, with the dataset's preprocessing for ``gopt
predict``); baselines leave their trained tensors (``trained.safetensors``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch

from gopt_adapter import GoptAdapter, count_parameters, save_adapter
from gopt_adapter.backbone import create_backbone
from gopt_adapter.baselines import VARIANTS, build_variant
from gopt_adapter.datasets import DATASETS, get_dataset
from gopt_adapter.engine import (
    CheckpointError,
    TrainConfig,
    Trainer,
    default_device,
    init_distributed,
    json_safe,
    seed_everything,
    shutdown_distributed,
    trainable_state_dict,
)
from gopt_adapter.files import atomic_write_bytes, write_tensors
from gopt_adapter.preprocessing import dataset_preprocessing
from gopt_adapter.transforms import NormalizeConfig, TrainTransformConfig, build_transforms, default_train_config

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
ADAPTER_NAME = "adapter.safetensors"  # GoPT variants: the adapter file, with its preprocessing
TRAINED_NAME = "trained.safetensors"  # baselines: their trainable tensors, by state-dict name
_TEXT_SETTINGS = ("dataset", "variant", "backbone", "train_split", "val_split", "out")
_OPTIONAL_TEXT_SETTINGS = ("root", "weights")
_GROUP_SETTINGS = ("backbone_kwargs", "dataset_options", "val_options", "transforms", "variant_options", "train")


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
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_options: dict[str, Any] = field(default_factory=dict)
    val_options: dict[str, Any] = field(default_factory=dict)
    transforms: dict[str, Any] = field(default_factory=dict)
    variant_options: dict[str, Any] = field(default_factory=dict)
    train: TrainConfig = field(default_factory=TrainConfig)
    train_split: str = "train"
    val_split: str = "test"
    out: str = "runs/default"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)}")
    parser.add_argument("--root", help="folder of your copy of the dataset (not needed for synthetic)")
    parser.add_argument("--variant", default="gopt", help=f"one of {sorted(VARIANTS)}")
    parser.add_argument("--config", help="JSON settings file (default: benchmarks/configs/<dataset>.json)")
    parser.add_argument("--backbone", help="timm model name (default from the config)")
    parser.add_argument("--weights", help="pretrained weights file for the backbone (.pth/.safetensors)")
    parser.add_argument("--out", help="output folder (default runs/<dataset>_<variant>)")
    parser.add_argument("--train-split", help="split to train on (default train)")
    parser.add_argument("--val-split", help="split to evaluate on (default test; synthetic: val)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting, JSON value, dotted key: train.epochs=2, "
                             "dataset_options.mode=\"thermal\", variant_options.hidden_dim=16 (repeatable)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda when available)")
    return parser.parse_args(argv)


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """Config file, then the flags, then ``--set`` overrides; validated."""
    dataset = args.dataset.lower().replace("-", "_")
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {args.dataset!r}; choose one of {sorted(DATASETS)}")
    path = Path(args.config) if args.config else CONFIG_DIR / f"{dataset}.json"
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
    for key in ("root", "variant", "backbone", "weights", "out", "train_split", "val_split"):
        if getattr(args, key, None) is not None:
            raw[key] = getattr(args, key)
    for item in args.set:
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
    if dataset == "synthetic":
        raw.setdefault("val_split", "val")
    raw.setdefault("out", f"runs/{dataset}_{raw.get('variant', 'gopt')}")
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
    if config.weights and not Path(config.weights).is_file():
        raise UsageError(f"weights file {config.weights} not found")
    return config


def _check_setting_types(raw: dict[str, Any]) -> None:
    """Text settings must be strings and groups JSON objects (a wrong type would fail deep inside)."""
    for key in _TEXT_SETTINGS + _OPTIONAL_TEXT_SETTINGS:
        if key in raw and not isinstance(raw[key], str) and not (key in _OPTIONAL_TEXT_SETTINGS and raw[key] is None):
            raise UsageError(f"setting {key} must be a string, got {raw[key]!r}")
    for key in _GROUP_SETTINGS:
        if key in raw and not isinstance(raw[key], dict):
            raise UsageError(f"setting {key} must be a JSON object of settings, got {raw[key]!r}")


def build_backbone(config: RunConfig) -> torch.nn.Module:
    """The timm backbone with the user's weights, ready for dense prediction at any size."""
    try:
        model = create_backbone(config.backbone, config.weights, config.backbone_kwargs)
    except RuntimeError as exc:  # state-dict mismatch
        if not config.weights:
            raise UsageError(f"cannot create backbone {config.backbone!r}: {str(exc).splitlines()[0]}") from None
        raise UsageError(f"weights {config.weights} do not fit backbone {config.backbone}: {str(exc).splitlines()[0]}") from None
    except Exception as exc:
        raise UsageError(f"cannot create backbone {config.backbone!r}: {exc}") from None
    patch = getattr(getattr(model, "patch_embed", None), "patch_size", (16, 16))
    if patch[0] % 2 and not getattr(model.patch_embed, "dynamic_img_pad", False):
        raise UsageError(f"{config.backbone} has patch size {patch}: add --set backbone_kwargs.dynamic_img_pad=true")
    return model


def build_transform_config(config: RunConfig) -> TrainTransformConfig:
    """The dataset's usual training transforms with ``config.transforms`` applied."""
    options = dict(config.transforms)
    valid = [f.name for f in dataclasses.fields(TrainTransformConfig)]
    try:
        if "normalize" in options:
            if not isinstance(options["normalize"], dict):
                raise TypeError("normalize must be an object such as {\"aux_mean\": [0.5], \"aux_std\": [0.5]}")
            options["normalize"] = NormalizeConfig(**options["normalize"])
        return default_train_config(config.dataset, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid transforms settings {config.transforms}: {exc} (keys: {valid})") from None


def build_datasets(config: RunConfig):
    """Train and val sets; one sample of each is read (RNG untouched) to catch bad files and settings now."""
    transforms = build_transform_config(config)
    try:
        train_set = get_dataset(config.dataset, root=config.root, split=config.train_split,
                                transform=build_transforms(config.dataset, True, transforms),
                                **config.dataset_options)
        val_set = get_dataset(config.dataset, root=config.root, split=config.val_split,
                              transform=build_transforms(config.dataset, False, normalize=transforms.normalize),
                              **{**config.dataset_options, **config.val_options})
    except (FileNotFoundError, ValueError, TypeError) as exc:
        raise UsageError(f"cannot read {config.dataset}: {exc}") from None
    for split, dataset in ((config.train_split, train_set), (config.val_split, val_set)):
        if len(dataset) == 0:
            raise UsageError(f"{config.dataset} split {split!r} has no samples")
        try:
            with torch.random.fork_rng(devices=[]):  # the random transforms must not shift the run's RNG
                dataset[0]
        except (OSError, ValueError, TypeError) as exc:
            raise UsageError(f"cannot read sample 0 of {config.dataset} split {split!r}: {exc}") from None
    return train_set, val_set


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


def run(config: RunConfig, resume: bool = False, device: str | None = None) -> dict[str, Any]:
    """Trains and evaluates; returns (and on rank 0 writes) the results record."""
    ctx = init_distributed()
    seed_everything(config.train.seed)  # random-init backbones and adapter inits are reproducible
    target = resolve_device(device, ctx)
    train_set, val_set = build_datasets(config)
    backbone = build_backbone(config)
    num_classes = len(train_set.class_names)
    try:
        model = build_variant(config.variant, backbone, train_set.aux_channels, num_classes, **config.variant_options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"cannot build variant {config.variant}: {exc}") from None
    preprocessing = dataset_preprocessing(val_set)  # how raw files became the inputs; gopt predict repeats it
    is_gopt = type(model.adapter) is GoptAdapter  # baselines share the segmenter, not the adapter file format
    if is_gopt:
        model.adapter.preprocessing = preprocessing
    params = count_parameters(model)
    try:
        trainer = Trainer(model, train_set, num_classes, config.train, config.out, val_set=val_set, device=target,
                          ctx=ctx)
    except ValueError as exc:  # batch size vs processes and data size, nothing to train
        raise UsageError(str(exc)) from None
    try:
        metrics = trainer.fit(resume=resume)
    except CheckpointError as exc:  # raised while resuming, before any training
        raise UsageError(str(exc)) from None
    finally:
        trainer.close()
    record = json_safe({  # standard JSON: NaN (a class never seen) becomes null
        "config": {**dataclasses.asdict(config), "train": dataclasses.asdict(config.train)},
        "metrics": metrics,
        "trainable_parameters": params.trainable,
        "total_parameters": params.total,
        "epochs_completed": trainer.epoch,
        # summed over the sessions of a resumed run (up to each one's last checkpoint)
        "wall_time_s": trainer.wall_seconds,
        "train_images_per_s": trainer.train_images / trainer.train_seconds if trainer.train_seconds > 0 else None,
        "hardware": hardware(target),
        "world_size": ctx.world_size,
        "class_names": list(train_set.class_names),
        "preprocessing": preprocessing.to_dict(),
    })
    if ctx.is_main:
        out = Path(config.out)
        if is_gopt:
            save_adapter(model, out / ADAPTER_NAME)
        else:  # what a baseline trained (head, aux branch, and the backbone where it trains)
            write_tensors(out / TRAINED_NAME, trainable_state_dict(model))
        atomic_write_bytes(out / "results.json", (json.dumps(record, indent=2, allow_nan=False) + "\n").encode())
    return record


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        config = load_run_config(args)
        record = run(config, resume=args.resume, device=args.device)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        shutdown_distributed()
    metrics = record["metrics"]
    print(json.dumps({k: v for k, v in metrics.items() if isinstance(v, float)}, indent=None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
