"""Training engine: schedule, state, sliding windows, exact resume."""

import json

import pytest
import torch

from gopt_adapter import apply_gopt
from gopt_adapter.datasets import get_dataset
from gopt_adapter.engine import (
    CHECKPOINT_NAME,
    LOG_NAME,
    Dist,
    TrainConfig,
    Trainer,
    evaluate,
    poly_lr_factor,
    sliding_window_logits,
    trainable_state_dict,
)
from gopt_adapter.transforms import build_transforms, default_train_config
from conftest import make_backbone, perturb_adapter


def test_poly_schedule_with_warmup():
    assert poly_lr_factor(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert poly_lr_factor(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert poly_lr_factor(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert poly_lr_factor(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert poly_lr_factor(55, 100, 10, 0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_lr_factor(100, 100, 10, 1.0) == 0.0


@pytest.mark.parametrize("bad", [dict(epochs=0), dict(lr=-1.0), dict(batch_size=6, grad_accum=4),
                                 dict(clip_grad_norm=0.0), dict(eval_stride=8)])
def test_train_config_validation(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_trainable_state_is_the_adapter_with_its_batchnorm_buffers():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3)
    state = trainable_state_dict(segmenter)
    expected = {f"adapters.default.{k}" for k in segmenter.adapter.state_dict()}
    assert set(state) == expected


class PixelModel(torch.nn.Module):
    """Per-pixel model: any window of it equals the same window of the whole image."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 3, 1)

    def forward(self, rgb, aux):
        return self.conv(torch.cat([rgb, aux], 1))


def test_sliding_window_equals_full_image_for_a_per_pixel_model():
    model = PixelModel()
    rgb, aux = torch.randn(1, 3, 37, 53), torch.randn(1, 1, 37, 53)
    full = model(rgb, aux)
    for window, stride in [(16, 16), (16, 8), (40, 40), (20, 7)]:
        torch.testing.assert_close(sliding_window_logits(model, rgb, aux, 3, window, stride), full)


def synthetic_sets(length=32):
    transforms = default_train_config("synthetic", crop_size=(32, 32))
    train = get_dataset("synthetic", split="train", mode="depth", size=32, length=length, seed=0,
                        transform=build_transforms("synthetic", True, transforms))
    val = get_dataset("synthetic", split="val", mode="depth", size=32, length=8, seed=0,
                      transform=build_transforms("synthetic", False))
    return train, val


def make_trainer(out, epochs):
    train, val = synthetic_sets()
    model = apply_gopt(make_backbone("vit", depth=2), aux_channels=train.aux_channels,
                       num_classes=len(train.class_names), hidden_dim=8, head_channels=16)
    config = TrainConfig(epochs=epochs, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, progress=False,
                         clip_grad_norm=1.0, grad_accum=2)
    return Trainer(model, train, len(train.class_names), config, out, val_set=val, device="cpu", ctx=Dist())


def test_training_logs_checkpoints_and_learns(tmp_path):
    trainer = make_trainer(tmp_path, epochs=3)
    metrics = trainer.fit()
    records = [json.loads(line) for line in (tmp_path / LOG_NAME).read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 3 * trainer.steps_per_epoch + 1))
    assert all(r["lr"] > 0 and r["images_per_s"] > 0 for r in steps)
    assert [r["epoch"] for r in records if r["event"] == "eval"] == [1, 2, 3]
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert 0 <= metrics["miou"] <= 1
    first, last = (sum(r["loss"] for r in steps if r["epoch"] == e) for e in (1, 3))
    assert last < first


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a", epochs=3)
    straight.fit()
    first = make_trainer(tmp_path / "b", epochs=3)
    first.config = TrainConfig(**{**first.config.__dict__, "epochs": 1})  # stop after one epoch
    first.fit()
    resumed = make_trainer(tmp_path / "b", epochs=3)
    perturb_adapter(resumed.model)  # the checkpoint must overwrite every adapter tensor
    resumed.fit(resume=True)
    assert resumed.step == straight.step
    a, b = straight.model.adapter.state_dict(), resumed.model.adapter.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
