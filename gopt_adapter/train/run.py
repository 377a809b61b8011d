"""One run of ``gopt train``: build the backbone, the datasets and the variant a
:class:`~gopt_adapter.train.run_config.RunConfig` describes, train and evaluate it, and leave
``results.json`` with the adapter file (GoPT variants) or the trained tensors (baselines).

Every input is checked before any training starts; a run that diverges raises
:class:`~gopt_adapter.errors.NonFiniteError`. ``resume=True`` continues an interrupted run from
its last checkpoint, or re-reports a finished one.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
from pathlib import Path
from typing import Any

import timm
import torch

from ..adapter import GoptAdapter
from ..atomic_files import atomic_write_bytes, write_tensors
from ..backbone import BackboneSpec, create_backbone
from ..baselines import build_variant
from ..calibration import calibrate_missing_mode
from ..data import get_dataset
from ..data.transforms import TrainTransformConfig, build_transforms, default_train_config
from ..errors import CheckpointError, UsageError
from ..gopt_segmenter import save_adapter
from ..parameters import count_parameters
from ..preprocessing import NormalizeConfig, dataset_preprocessing
from .engine import Trainer, init_distributed, json_safe, resolve_device, seed_everything, trainable_state_dict
from .losses import count_labels, enet_class_weights
from .run_config import RunConfig, check_backbone_init

ADAPTER_NAME = "adapter.safetensors"  # GoPT variants: the adapter file, with its preprocessing
TRAINED_NAME = "trained.safetensors"  # baselines: their trainable tensors, by state-dict name


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
    ``ce_weighted``, :mod:`gopt_adapter.train.losses`): one pass over the labels as stored, before
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

    Raises :class:`UsageError` for bad inputs and :class:`~gopt_adapter.errors.NonFiniteError`
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
