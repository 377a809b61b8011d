"""Field tests: real frames and real weights from ``../shared/field`` (skipped where it is absent).

Cheap on purpose (one forward, no gradient); what training on them gives is a benchmark's job.
"""

import pytest
import torch

from datasets_helpers import FIELD
from gopt_adapter import recipe
from gopt_adapter.baselines import build_variant
from gopt_adapter.preprocessing import dataset_preprocessing
from gopt_adapter.transforms import NormalizeConfig

MFNET = FIELD / "mfnet_subset"
DINOV2 = FIELD / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"

pytestmark = [pytest.mark.skipif(not (MFNET / "val.txt").is_file() or not DINOV2.is_file(),
                                 reason="../shared/field (real MFNet frames, real ViT-S/14 weights) is absent"),
              pytest.mark.usefixtures("one_thread")]


def test_a_patch_14_backbone_runs_on_a_real_480x640_mfnet_frame_with_no_flags():
    """The recipe's own builders, as ``gopt train --dataset mfnet --backbone vit_small_patch14_dinov2
    --weights ...`` runs them: 14 does not divide 480x640, and no flag is needed; DINOv2's
    pretrained_cfg keeps ImageNet's mean/std; GoPT's logits cover the whole frame."""
    config = recipe.load_run_config(recipe.parse_args(
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
