"""End-to-end demo on the built-in synthetic RGB-X world (runs on 2 CPU cores in minutes).

1. Train a small RGB-only foundation ViT (SETR-naive head, full fine-tuning).
2. Freeze it, apply GoPT (with ``aux_dropout``, so it also learns to work without aux), train
   only the adapter on RGB + aux, then calibrate its aux-missing mode on the training scenes.
3. Evaluate both: mIoU overall and on the classes that only the aux channel separates, and
   GoPT once more with no aux image at all (its aux-missing mode).
4. Save the adapter with the synthetic world's preprocessing (aux in [0, 1] scaled by the
   dtype maximum, the default mean/std) and class names, reload it into a fresh segmenter
   built from the saved foundation weights, and check that the reloaded one predicts exactly
   the same and carries the same preprocessing and class names.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..backbone import create_backbone
from ..data.aux_faults import WithoutAux
from ..baselines import AUX_DROPOUT, build_variant
from ..calibration import calibrate_missing_mode
from ..data import get_dataset
from ..train.engine import Dist, TrainConfig, Trainer, evaluate
from ..atomic_files import write_tensors
from ..gopt_segmenter import apply_gopt, load_adapter, remove_gopt, save_adapter
from ..parameters import count_parameters
from ..preprocessing import dataset_preprocessing
from ..data.transforms import build_transforms, default_train_config


@dataclass(frozen=True)
class DemoConfig:
    mode: str = "depth"
    size: int = 64
    train_length: int = 512
    val_length: int = 128
    seed: int = 0
    backbone: str = "vit_base_patch16_224"
    backbone_kwargs: dict[str, Any] = field(default_factory=lambda: dict(
        embed_dim=96, depth=4, num_heads=3, patch_size=8, img_size=64, dynamic_img_size=True))
    foundation: TrainConfig = TrainConfig(epochs=6, batch_size=16, lr=1e-3, weight_decay=0.01, warmup_steps=10,
                                          amp=False, log_every=8)
    gopt: TrainConfig = TrainConfig(epochs=15, batch_size=16, lr=3e-3, weight_decay=0.01, warmup_steps=10,
                                    amp=False, log_every=8)
    aux_dropout: float = AUX_DROPOUT  # GoPT's aux-missing mode trains on this share of the samples
    out: str = "runs/demo"


def synthetic_datasets(config: DemoConfig):
    """The demo's training (with augmentation) and validation sets of the synthetic world."""
    crop = default_train_config("synthetic", crop_size=(config.size, config.size))
    common = dict(mode=config.mode, size=config.size, seed=config.seed, cache=True)  # read once per epoch
    train = get_dataset("synthetic", split="train", length=config.train_length,
                        transform=build_transforms("synthetic", True, crop), **common)
    val = get_dataset("synthetic", split="val", length=config.val_length,
                      transform=build_transforms("synthetic", False), **common)
    return train, val


def class_miou(metrics: dict[str, Any], classes) -> float:
    """Mean IoU over ``classes`` (those present in prediction or target)."""
    values = [metrics["iou"][c] for c in classes if metrics["iou"][c] is not None and not math.isnan(metrics["iou"][c])]
    return sum(values) / len(values) if values else float("nan")


def build_foundation_backbone(config: DemoConfig, weights: str | Path | None = None) -> torch.nn.Module:
    """The demo's small ViT: random (seeded by the caller) or holding ``weights`` (safetensors)."""
    return create_backbone(config.backbone, weights, config.backbone_kwargs)


def train_foundation(config: DemoConfig, weights: str | Path, progress: bool = True, seed: int | None = None):
    """Trains the RGB-only foundation ViT (SETR-naive head, full fine-tuning) on the synthetic
    world and writes the ViT's weights to ``weights``, as a user's pretrained checkpoint.

    ``seed`` seeds the training (initialisation, data order, augmentation); ``None`` means
    ``config.seed``, which always chooses the world's scenes, so foundations of several seeds
    are trained on the same data.

    Returns ``(vit, metrics, trainable_parameters)``.
    """
    seed = config.seed if seed is None else seed
    train, val = synthetic_datasets(config)
    num_classes = len(train.class_names)
    torch.manual_seed(seed)
    foundation = build_variant("foundation", build_foundation_backbone(config), train.aux_channels, num_classes)
    trainer = Trainer(foundation, train, num_classes, replace(config.foundation, seed=seed, progress=progress),
                      Path(config.out) / "foundation", val_set=val, device="cpu", ctx=Dist())
    metrics = trainer.fit()
    trainable = count_parameters(foundation).trainable
    vit = remove_gopt(foundation)  # the fine-tuned ViT without its head
    write_tensors(weights, vit.state_dict())
    return vit, metrics, trainable


@torch.no_grad()
def _predictions(model, dataset) -> list[torch.Tensor]:
    model.eval()
    return [model(s["rgb"][None], s["aux"][None]).argmax(1) for s in (dataset[i] for i in range(len(dataset)))]


def run_demo(config: DemoConfig = DemoConfig(), progress: bool = True) -> dict[str, Any]:
    """Runs the demo and returns its measurements (also printed as a table)."""
    start = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train, val = synthetic_datasets(config)
    num_classes, aux_classes = len(train.class_names), sorted(train.aux_dependent_classes)
    rgb_classes = [c for c in range(num_classes) if c not in train.aux_dependent_classes]

    print(f"[1/4] training the RGB-only foundation ViT on the synthetic {config.mode} world", file=sys.stderr)
    weights = out / "foundation_vit.safetensors"
    vit, foundation_metrics, foundation_params = train_foundation(config, weights, progress)

    print("[2/4] freezing it and training the GoPT adapter on RGB + aux", file=sys.stderr)
    segmenter = apply_gopt(vit, train.aux_channels, num_classes, aux_dropout=config.aux_dropout)
    segmenter.adapter.preprocessing = dataset_preprocessing(val)  # what gopt predict needs to repeat
    segmenter.adapter.class_names = train.class_names  # the legend of gopt predict
    gopt_metrics = Trainer(segmenter, train, num_classes, replace(config.gopt, seed=config.seed, progress=progress),
                           out / "gopt", val_set=val, device="cpu", ctx=Dist()).fit()
    if segmenter.config.has_missing_mode:
        print(calibrate_missing_mode(segmenter, train).summary(), file=sys.stderr)

    print("[3/4] saving the adapter and reloading it into a fresh segmenter", file=sys.stderr)
    adapter_path = save_adapter(segmenter, out / "gopt_adapter.safetensors")
    fresh = apply_gopt(build_foundation_backbone(config, weights), **segmenter.config.to_dict())
    load_adapter(fresh, adapter_path)
    same = fresh.adapter.preprocessing == segmenter.adapter.preprocessing and \
        fresh.adapter.class_names == segmenter.adapter.class_names and all(
        torch.equal(a, b) for a, b in zip(_predictions(segmenter, val), _predictions(fresh, val)))
    reloaded_metrics = evaluate(fresh, val, num_classes)
    missing_metrics = evaluate(WithoutAux(fresh), val, num_classes) if fresh.config.has_missing_mode else None

    print("[4/4] results", file=sys.stderr)
    rows = [
        ("foundation (RGB only, full FT)", foundation_params, "-", foundation_metrics),
        ("GoPT (frozen foundation + adapter)", count_parameters(segmenter).trainable,
         f"{adapter_path.stat().st_size / 1e6:.2f} MB", gopt_metrics),
    ]
    if missing_metrics is not None:
        rows.append(("GoPT, aux missing (same adapter, aux=None)", count_parameters(segmenter).trainable,
                     f"{adapter_path.stat().st_size / 1e6:.2f} MB", missing_metrics))
    print(f"\nsynthetic {config.mode} world, {config.size}x{config.size}, {len(train)} train / {len(val)} val images; "
          f"classes needing aux: {[train.class_names[c] for c in aux_classes]}")
    print(f"best mIoU reachable from RGB alone (by construction): {train.rgb_only_miou_bound:.3f}\n")
    print("| model | trainable params | adapter file | mIoU | mIoU aux classes | mIoU RGB classes |")
    print("|---|---|---|---|---|---|")
    for name, params, size, metrics in rows:
        print(f"| {name} | {params:,} | {size} | {metrics['miou']:.3f} | {class_miou(metrics, aux_classes):.3f} "
              f"| {class_miou(metrics, rgb_classes):.3f} |")
    print(f"\nreloaded adapter predicts identically: {'yes' if same else 'NO'} "
          f"(mIoU {reloaded_metrics['miou']:.3f}); total time {time.perf_counter() - start:.0f} s")
    return {
        "foundation": foundation_metrics, "gopt": gopt_metrics, "gopt_aux_missing": missing_metrics,
        "reloaded_identical": same,
        "aux_classes": aux_classes, "rgb_only_bound": train.rgb_only_miou_bound,
        "gopt_trainable": count_parameters(segmenter).trainable, "adapter_bytes": adapter_path.stat().st_size,
    }
