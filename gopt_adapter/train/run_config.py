"""The settings of one run of ``gopt train``: a :class:`RunConfig`, read from a settings file,
the flags and ``--set`` overrides, each step its own function, validated before any work.

Settings come from the package's ``gopt_adapter/configs/<dataset>.json`` (the paper's for the
benchmarks: batch 64, 60 epochs, AdamW, LR 4e-5, polynomial decay, MAE ViT-B; a starting point
for ``folder``) and are overridden by the flags. The backbone's weights must be chosen
explicitly: ``--weights FILE`` (local ``.safetensors`` / ``.pth``), ``--pretrained`` (timm's
download) or ``--random-init`` (from scratch, on purpose; the synthetic config sets it).
:mod:`gopt_adapter.train.run` runs what these describe.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from ..baselines import VARIANTS
from ..data import DATASETS
from ..errors import UsageError
from .engine import TrainConfig

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")  # .pth/.pt/.bin are read with weights_only=True
INIT_FLAGS = "--weights FILE, --pretrained or --random-init"
#: The text settings a flag of the same name sets (``--root``, ``--val-split``, ...).
_FLAG_SETTINGS = ("root", "variant", "backbone", "out", "train_split", "val_split")
_TEXT_SETTINGS = ("dataset", "variant", "backbone", "train_split", "val_split", "out")
_OPTIONAL_TEXT_SETTINGS = ("root", "weights")
_BOOL_SETTINGS = ("pretrained", "random_init")
_GROUP_SETTINGS = ("backbone_kwargs", "dataset_options", "val_options", "transforms", "variant_options", "train")
#: Default evaluation split per dataset (the others evaluate on "test").
_VAL_SPLITS = {"synthetic": "val", "folder": "val"}


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


def load_run_config(args: argparse.Namespace) -> RunConfig:
    """The run ``gopt train`` was asked for: the settings file (``--config``, else the packaged
    one of ``--dataset``), then the flags, then the ``--set`` overrides, validated."""
    dataset = check_dataset(args.dataset)
    settings, source = read_settings(dataset, getattr(args, "config", None))
    apply_flags(settings, **{key: getattr(args, key, None) for key in _FLAG_SETTINGS})
    apply_weights_flags(settings, getattr(args, "weights", None), getattr(args, "pretrained", False),
                        getattr(args, "random_init", False))
    apply_overrides(settings, getattr(args, "set", []))
    if getattr(args, "no_progress", False):
        settings.setdefault("train", {})
        if isinstance(settings["train"], dict):
            settings["train"]["progress"] = False
    return run_config(settings, dataset, source)


def check_dataset(name: str) -> str:
    """The dataset's registry name (``NYUDv2`` and ``whu-opt-sar`` are accepted as spelt)."""
    dataset = name.lower().replace("-", "_")
    if dataset not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    return dataset


def read_settings(dataset: str, config_file: str | None = None) -> tuple[dict[str, Any], Path]:
    """The JSON object of settings in ``config_file`` (default: the packaged file of
    ``dataset``), and its path."""
    path = Path(config_file) if config_file else config_path(dataset)
    try:
        settings = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"config file {path} not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"config file {path} is not valid JSON: {exc}") from None
    except OSError as exc:
        raise UsageError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not isinstance(settings, dict):
        raise UsageError(f"config file {path} must hold a JSON object of settings")
    settings["dataset"] = dataset
    return settings, path


def apply_flags(settings: dict[str, Any], **flags: str | None) -> None:
    """The text flags given (not ``None``), e.g. ``root``, ``backbone``, ``val_split``, over the file's."""
    for key, value in flags.items():
        if key not in _FLAG_SETTINGS:
            raise TypeError(f"apply_flags: no flag setting {key!r}")
        if value is not None:
            settings[key] = value


def apply_weights_flags(settings: dict[str, Any], weights: str | None, pretrained: bool, random_init: bool) -> None:
    """The command line chooses the backbone's weights over the settings file when it names any."""
    flags = {"weights": weights, "pretrained": pretrained, "random_init": random_init}
    if any(flags.values()):
        settings.update(flags)


def apply_overrides(settings: dict[str, Any], items: list[str]) -> None:
    """``--set KEY=VALUE`` items: a JSON value (else the bare string) at a dotted key."""
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise UsageError(f"--set {item!r}: expected KEY=VALUE")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # bare strings are fine: --set dataset_options.mode=thermal
        target = settings
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UsageError(f"--set {item!r}: {parent!r} is {target!r}, not a group of settings")
        target[leaf] = parsed


def run_config(settings: dict[str, Any], dataset: str, source: Path | str = "the settings") -> RunConfig:
    """The validated :class:`RunConfig` of ``settings`` (``source`` names them in errors): known
    keys of the right types, a known variant, the dataset's root and the weights file present."""
    if settings["dataset"] != dataset:
        raise UsageError(f"--set dataset={settings['dataset']!r}: choose the dataset with --dataset")
    if dataset in _VAL_SPLITS:
        settings.setdefault("val_split", _VAL_SPLITS[dataset])
    settings.setdefault("out", f"runs/{dataset}_{settings.get('variant', 'gopt')}")
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        raise UsageError(f"unknown settings {unknown} in {source} or --set; valid: {sorted(known)}")
    _check_setting_types(settings)
    try:
        train = TrainConfig(**settings.get("train", {}))
    except (TypeError, ValueError) as exc:
        raise UsageError(f"invalid train settings: {exc}") from None
    config = RunConfig(**{**settings, "train": train})
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
