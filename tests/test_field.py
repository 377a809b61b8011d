"""Field tests: real frames and real weights from ``../shared/field`` (skipped where it is absent).

Cheap on purpose (one forward; a few steps on two frames at a fifth of their size); what training
on them gives is a benchmark's job (``benchmarks.field``).
"""

import json

import pytest
import torch
import torch.nn.functional as F

from datasets_helpers import FIELD
from gopt_adapter import apply_gopt
from gopt_adapter.train import run as recipe
from gopt_adapter.backbone import create_backbone
from gopt_adapter.baselines import build_variant
from gopt_adapter.data import get_dataset
from gopt_adapter.preprocessing import dataset_preprocessing
from gopt_adapter.preprocessing import IMAGENET_MEAN, IMAGENET_STD, NormalizeConfig
from gopt_adapter.cli.commands import build_train_parser
from gopt_adapter.train.run_config import load_run_config

MFNET = FIELD / "mfnet_subset"
DINOV2 = FIELD / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"

pytestmark = [pytest.mark.skipif(not (MFNET / "val.txt").is_file() or not DINOV2.is_file(),
                                 reason="../shared/field (real MFNet frames, real ViT-S/14 weights) is absent"),
              pytest.mark.usefixtures("one_thread")]


def test_a_patch_14_backbone_runs_on_a_real_480x640_mfnet_frame_with_no_flags():
    """The recipe's own builders, as ``gopt train --dataset mfnet --backbone vit_small_patch14_dinov2
    --weights ...`` runs them: 14 does not divide 480x640, and no flag is needed; DINOv2's
    pretrained_cfg keeps ImageNet's mean/std; GoPT's logits cover the whole frame."""
    config = load_run_config(build_train_parser().parse_args(
        ["--dataset", "mfnet", "--root", str(MFNET), "--backbone", "vit_small_patch14_dinov2",
         "--weights", str(DINOV2), "--val-split", "val"]))
    backbone = recipe.build_backbone(config)
    _, val_set = recipe.build_datasets(config, recipe.backbone_transform_defaults(config, backbone))
    assert dataset_preprocessing(val_set).normalize == NormalizeConfig()
    sample = val_set[0]
    assert sample["rgb"].shape == (3, 480, 640) and sample["aux"].shape == (1, 480, 640)
    segmenter = build_variant("gopt", backbone, val_set.aux_channels, len(val_set.class_names))
    with torch.no_grad():
        logits = segmenter(sample["rgb"][None], sample["aux"][None])  # [1, 9, 480, 640] from a 35x46 token grid
    assert logits.shape == (1, 9, 480, 640) and bool(torch.isfinite(logits).all())


def real_batch(stems_at: tuple[int, ...], scale: float):
    """Frames of the field's ``train`` split at ``scale``, normalised as the backbone was trained."""
    dataset = get_dataset("mfnet", root=MFNET, split="train")
    rgb, aux, label = [], [], []
    for index in stems_at:
        sample = dataset[index]
        size = [round(side * scale) for side in sample["label"].shape]
        rgb.append(F.interpolate(sample["rgb"][None], size, mode="bilinear", antialias=True)[0])
        aux.append(F.interpolate(sample["aux"][None], size, mode="bilinear", antialias=True)[0])
        label.append(F.interpolate(sample["label"][None, None].float(), size, mode="nearest")[0, 0].long())
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.stack(rgb) - mean) / std, (torch.stack(aux) - 0.5) / 0.5, torch.stack(label)


def test_gopt_trains_on_two_real_frames_with_finite_gradients_and_a_falling_loss():
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch14_dinov2", DINOV2, {"dynamic_img_pad": True})
    segmenter = apply_gopt(backbone, aux_channels=1, num_classes=9)
    rgb, aux, label = real_batch((0, 50), scale=0.2)  # a day and a night frame, 96x128: 7x10 patches
    params = [p for p in segmenter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    losses = []
    for _ in range(12):
        loss = F.cross_entropy(segmenter(rgb, aux), label)
        optimizer.zero_grad()
        loss.backward()
        bad = [name for name, p in segmenter.named_parameters() if p.grad is not None and not p.grad.isfinite().all()]
        assert not bad, f"non-finite gradients in {bad[:5]}"
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(p).all() for p in params)
    assert losses[-1] < 0.5 * losses[0], losses


def test_the_field_benchmark_trains_gopt_and_the_probe_to_finite_weights_that_predict_several_classes(
        tmp_path, capsys):
    """``python -m benchmarks.field --quick`` for GoPT and the RGB-only probe it must beat, on 32
    frames at 0.15 of their size, through ``gopt train``'s own path; a row with non-finite steps or
    one predicted class would make it exit 1. Run again, it reuses every record. (Every row is
    built and trained a step, moving exactly its trainable set, by ``tests/test_baselines.py``; the full field run's
    records are in docs/results.md.)"""
    from benchmarks import field

    rows = ("probe", "gopt")
    argv = ["--quick", "--out", str(tmp_path), "--root", str(MFNET), "--weights", str(DINOV2), "--variants", *rows,
            "--workers", "1"]
    assert field.main(argv) == 0
    records = [json.loads(path.read_text()) for path in sorted((tmp_path / "runs").glob("*.json"))]
    assert sorted(r["variant"] for r in records) == sorted(rows)
    for record in records:
        assert record["nonfinite_steps"] == 0 and record["predicted_classes"] >= 2
        assert 0 <= record["miou"] <= 1 and set(record["iou"]) == set(field.SHOWN_CLASSES)
    capsys.readouterr()
    assert field.main(argv) == 0
    assert f"({len(rows)} runs found finished were not run again)" in capsys.readouterr().out


def test_the_shipped_field_settings_are_gopt_train_config_files(tmp_path):
    """``benchmarks/configs/field_<variant>.json`` load through ``gopt train --config`` as the
    benchmark's recipe at the row's chosen LR; ``write_configs`` makes them, folder included."""
    from benchmarks import field

    for variant in field.ROWS:
        path = field.CONFIGS / f"field_{variant}.json"
        config = load_run_config(build_train_parser().parse_args(
            ["--dataset", "mfnet", "--config", str(path), "--root", str(MFNET), "--weights", str(DINOV2)]))
        assert config.variant == variant and config.backbone == field.BACKBONE
        assert json.loads(path.read_text()) == field.FieldRecipe().settings(variant, config.train.lr)
        assert config.train.lr in field.FieldRecipe().lr_grid
    written = field.write_configs(field.QUICK, {"gopt": 0.01}, tmp_path / "new")
    assert json.loads(written[0].read_text()) == field.QUICK.settings("gopt", 0.01)
