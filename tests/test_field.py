"""Real frames and real weights (``../shared/field``): GoPT trains soundly on them.

Skipped where ``../shared/field`` is absent.
"""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gopt_adapter import apply_gopt
from gopt_adapter.backbone import create_backbone
from gopt_adapter.datasets import get_dataset
from gopt_adapter.transforms import IMAGENET_MEAN, IMAGENET_STD

FIELD = Path(__file__).resolve().parents[2] / "shared" / "field"
ROOT = FIELD / "mfnet_subset"
WEIGHTS = FIELD / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"

pytestmark = pytest.mark.skipif(not WEIGHTS.is_file(), reason="../shared/field (real frames and weights) is absent")


def real_batch(stems_at: tuple[int, ...], scale: float):
    """Frames of the field's ``train`` split at ``scale``, normalised as the backbone was trained."""
    dataset = get_dataset("mfnet", root=ROOT, split="train")
    rgb, aux, label = [], [], []
    for index in stems_at:
        sample = dataset[index]
        size = [round(side * scale) for side in sample["label"].shape]
        rgb.append(F.interpolate(sample["rgb"][None], size, mode="bilinear", antialias=True)[0])
        aux.append(F.interpolate(sample["aux"][None], size, mode="bilinear", antialias=True)[0])
        label.append(F.interpolate(sample["label"][None, None].float(), size, mode="nearest")[0, 0].long())
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (torch.stack(rgb) - mean) / std, (torch.stack(aux) - 0.5) / 0.5, torch.stack(label)


def test_gopt_trains_on_two_real_frames_with_finite_gradients_and_a_falling_loss(one_thread):
    torch.manual_seed(0)
    backbone = create_backbone("vit_small_patch14_dinov2", WEIGHTS, {"dynamic_img_pad": True})
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
