"""Joint transforms: geometry shared across modalities, nearest labels, padding, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gopt_adapter.data import SyntheticRGBX
from gopt_adapter.data.transforms import (
    DEFAULT_TRAIN_SETTINGS,
    RandomCrop,
    RandomHorizontalFlip,
    RandomScale,
    TrainTransformConfig,
    build_transforms,
    default_train_config,
)
from gopt_adapter.preprocessing import Normalize, NormalizeConfig, ScaleImage
from gopt_adapter.resize import resize_sample


def make_sample(h: int = 6, w: int = 8, aux_channels: int = 1, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "rgb": torch.rand(3, h, w, generator=g),
        "aux": torch.rand(aux_channels, h, w, generator=g),
        "label": torch.randint(0, 5, (h, w), generator=g),
        "meta": {"stem": "x", "size": (h, w)},
    }


def coord_sample(h: int, w: int) -> dict:
    """Sample whose channels encode pixel position, to check that modalities move together."""
    ids = torch.arange(h * w).view(h, w)
    return {
        "rgb": ids.float().expand(3, h, w).clone(),
        "aux": ids.float()[None].clone(),
        "label": ids.clone(),
        "meta": {"stem": "c", "size": (h, w)},
    }


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        TrainTransformConfig(crop_size=(0, 4))
    with pytest.raises(ValueError, match="scale_range"):
        TrainTransformConfig(crop_size=(4, 4), scale_range=(1.5, 0.5))
    with pytest.raises(ValueError, match="flip_prob"):
        TrainTransformConfig(crop_size=(4, 4), flip_prob=1.5)
    with pytest.raises(ValueError, match="std"):
        NormalizeConfig(aux_std=(0.0,))
    with pytest.raises(ValueError, match="rgb_mean"):
        NormalizeConfig(rgb_mean=(0.5,))
    with pytest.raises(ValueError, match="unknown dataset"):
        build_transforms("imagenet", train=True)
    cfg = default_train_config("nyudv2", crop_size=(32, 40))
    assert cfg.crop_size == (32, 40) and cfg.scale_range == (0.5, 1.75)
    assert default_train_config("sunrgbd").crop_size == (480, 480)


def test_flip_moves_all_modalities() -> None:
    s = coord_sample(4, 5)
    out = RandomHorizontalFlip(1.0)(s)
    for key in ("rgb", "aux", "label"):
        assert torch.equal(out[key], s[key].flip(-1))
    assert RandomHorizontalFlip(0.0)(s) is s


def test_crop_pads_with_zero_and_ignore() -> None:
    s = make_sample(3, 4)
    out = RandomCrop((5, 6))(s, torch.Generator().manual_seed(0))
    assert out["rgb"].shape == (3, 5, 6) and out["label"].shape == (5, 6)
    assert torch.equal(out["rgb"][:, :3, :4], s["rgb"])  # pad goes bottom/right
    assert bool((out["rgb"][:, 3:] == 0).all()) and bool((out["aux"][:, :, 4:] == 0).all())
    assert bool((out["label"][3:] == 255).all()) and bool((out["label"][:, 4:] == 255).all())


def test_crop_per_channel_fill_and_no_copy_when_inside() -> None:
    s = make_sample(2, 2, aux_channels=2)
    out = RandomCrop((3, 3), rgb_fill=(0.1, 0.2, 0.3), aux_fill=(0.7, 0.8))(s)
    assert torch.allclose(out["rgb"][:, 2, 2], torch.tensor([0.1, 0.2, 0.3]))
    assert torch.allclose(out["aux"][:, 2, 0], torch.tensor([0.7, 0.8]))
    assert torch.equal(out["label"][:2, :2], s["label"])


def test_train_pipeline_pads_to_exact_zero_after_normalisation() -> None:
    cfg = default_train_config("nyudv2", crop_size=(10, 12), scale_range=(1.0, 1.0), flip_prob=0.0)
    out = build_transforms("nyudv2", train=True, config=cfg)(make_sample(6, 8))
    assert bool((out["rgb"][:, 6:] == 0).all()) and bool((out["aux"][:, :, 8:] == 0).all())
    assert bool((out["label"][6:] == 255).all()) and bool((out["label"][:6, :8] != 255).all())
    expected = (make_sample(6, 8)["rgb"] - torch.tensor(cfg.normalize.rgb_mean).view(3, 1, 1)) / torch.tensor(
        cfg.normalize.rgb_std).view(3, 1, 1)
    assert torch.allclose(out["rgb"][:, :6, :8], expected)


def test_crop_is_aligned_across_modalities() -> None:
    s = coord_sample(10, 12)
    for seed in range(5):
        out = RandomCrop((4, 7))(s, torch.Generator().manual_seed(seed))
        assert torch.equal(out["rgb"][0].long(), out["label"]) and torch.equal(out["aux"][0].long(), out["label"])
        top, left = divmod(int(out["label"][0, 0]), 12)
        assert torch.equal(out["label"], s["label"][top : top + 4, left : left + 7])


def test_resize_label_nearest_exact() -> None:
    label = torch.tensor([[1, 2], [3, 255]])
    s = {"rgb": torch.zeros(3, 2, 2), "aux": torch.zeros(1, 2, 2), "label": label, "meta": {}}
    up = resize_sample(s, (4, 6))["label"]
    expected = np.repeat(np.repeat(label.numpy(), 2, axis=0), 3, axis=1)
    assert torch.equal(up, torch.from_numpy(expected))
    # downscale of a blocky map picks exact input values (never an average)
    big = resize_sample({**s, "label": torch.from_numpy(expected)}, (2, 2))["label"]
    assert torch.equal(big, label)


def test_random_scale_keeps_label_values_and_alignment() -> None:
    s = make_sample(20, 30)
    s["label"][0, 0] = 255
    out = RandomScale((0.5, 2.0))(s, torch.Generator().manual_seed(3))
    h, w = out["label"].shape
    assert out["rgb"].shape == (3, h, w) and out["aux"].shape == (1, h, w)
    assert set(out["label"].unique().tolist()) <= set(s["label"].unique().tolist())
    assert out["label"].dtype == torch.int64
    assert abs(h / 20 - w / 30) < 0.1  # same factor on both sides


def test_normalize_matches_formula_and_checks_channels() -> None:
    s = make_sample(aux_channels=2)
    cfg = NormalizeConfig(aux_mean=(0.1, 0.2), aux_std=(0.5, 0.25))
    out = Normalize(cfg)(s)
    mean = torch.tensor(cfg.rgb_mean).view(3, 1, 1)
    std = torch.tensor(cfg.rgb_std).view(3, 1, 1)
    assert torch.allclose(out["rgb"], (s["rgb"] - mean) / std)
    assert torch.allclose(out["aux"][1], (s["aux"][1] - 0.2) / 0.25)
    with pytest.raises(ValueError, match="aux has 1 channels"):
        Normalize(cfg)(make_sample(aux_channels=1))


def test_train_pipeline_shape_and_seed_determinism() -> None:
    t = build_transforms("synthetic", train=True, config=default_train_config("synthetic", crop_size=(24, 20)))
    s = make_sample(16, 18)
    a = t(s, torch.Generator().manual_seed(7))
    b = t(s, torch.Generator().manual_seed(7))
    for key in ("rgb", "aux", "label"):
        assert torch.equal(a[key], b[key])
    assert a["rgb"].shape == (3, 24, 20) and a["label"].shape == (24, 20)
    assert a["meta"]["size"] == (16, 18)
    outputs = {tuple(t(s, torch.Generator().manual_seed(k))["label"].flatten().tolist()) for k in range(6)}
    assert len(outputs) > 1  # the seed matters
    # global RNG path (what a DataLoader worker uses)
    torch.manual_seed(11)
    c = t(s)
    torch.manual_seed(11)
    assert torch.equal(c["rgb"], t(s)["rgb"])


def test_eval_keeps_full_size_and_only_normalises() -> None:
    s = make_sample(13, 17)
    out = build_transforms("mfnet", train=False)(s)
    assert out["rgb"].shape == (3, 13, 17) and torch.equal(out["label"], s["label"])
    assert torch.allclose(out["aux"], (s["aux"] - 0.5) / 0.5)


@pytest.mark.parametrize("name", sorted(DEFAULT_TRAIN_SETTINGS))
def test_defaults_build_for_every_dataset(name: str) -> None:
    cfg = default_train_config(name, crop_size=(16, 16))
    out = build_transforms(name, train=True, config=cfg)(make_sample(12, 10))
    assert out["rgb"].shape == (3, 16, 16)


def test_with_dataset_and_dataloader() -> None:
    ds = SyntheticRGBX("depth", length=4, size=32, transform=build_transforms(
        "synthetic", train=True, config=default_train_config("synthetic", crop_size=(24, 24))))
    torch.manual_seed(0)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["rgb"].shape == (4, 3, 24, 24) and batch["label"].shape == (4, 24, 24)
    labels = batch["label"]
    assert bool(((labels < ds.num_classes) | (labels == 255)).all())


def test_without_augmentation_training_takes_the_centred_window_and_draws_nothing() -> None:
    cfg = default_train_config("nyudv2", crop_size=(4, 6), augment=False)
    pipeline = build_transforms("nyudv2", train=True, config=cfg)
    assert [type(t).__name__ for t in pipeline.transforms] == ["CenterCrop", "Normalize"]
    sample = coord_sample(9, 10)
    before = torch.get_rng_state()
    outs = [pipeline(sample, torch.Generator().manual_seed(seed)) for seed in range(3)] + [pipeline(sample)]
    assert torch.equal(torch.get_rng_state(), before)  # no draw from the global RNG either
    expected = torch.arange(9 * 10).view(9, 10)[2:6, 2:8]  # rows (9 - 4) // 2 = 2.., columns (10 - 6) // 2 = 2..
    for out in outs:
        assert torch.equal(out["label"], expected)  # not flipped, not rescaled
        assert torch.equal(out["aux"], (expected.float()[None] - 0.5) / 0.5)
    padded = pipeline(make_sample(3, 4))  # smaller than the crop: padded at the bottom/right, 0 after normalising
    assert bool((padded["label"][3:] == 255).all()) and bool((padded["rgb"][:, :, 4:] == 0).all())
    assert torch.equal(padded["label"][:3, :4], make_sample(3, 4)["label"])


def test_augment_is_on_by_default_and_must_be_a_bool() -> None:
    assert default_train_config("nyudv2").augment is True
    names = [type(t).__name__ for t in build_transforms("nyudv2", train=True).transforms]
    assert names == ["RandomScale", "RandomCrop", "RandomHorizontalFlip", "Normalize"]
    for bad in ("false", 0, None):
        with pytest.raises(ValueError, match="augment must be true or false"):
            TrainTransformConfig(crop_size=(4, 4), augment=bad)


def test_image_scale_resizes_first_in_training_and_only_the_inputs_in_evaluation() -> None:
    """Half size: rgb/aux antialiased (a shrink), labels nearest in training and untouched in
    evaluation; the step leads both pipelines and is absent at scale 1 (pipelines unchanged)."""
    import torch.nn.functional as F

    sample = coord_sample(12, 20)
    train = build_transforms("nyudv2", True, default_train_config("nyudv2", crop_size=(6, 10), image_scale=0.5))
    evaluation = build_transforms("nyudv2", False, default_train_config("nyudv2", image_scale=0.5))
    assert [type(t).__name__ for t in train.transforms] == ["ScaleImage", "RandomScale", "RandomCrop",
                                                            "RandomHorizontalFlip", "Normalize"]
    assert [type(t).__name__ for t in evaluation.transforms] == ["ScaleImage", "Normalize"]
    assert [type(t).__name__ for t in build_transforms("nyudv2", False).transforms] == ["Normalize"]
    scaled = ScaleImage(0.5)(sample)
    expected_rgb = F.interpolate(sample["rgb"][None], size=(6, 10), mode="bilinear", antialias=True)[0]
    assert torch.equal(scaled["rgb"], expected_rgb)
    assert torch.equal(scaled["label"], sample["label"][1::2, 1::2])  # nearest (pixel centres): input values only
    out = evaluation(sample)
    assert out["rgb"].shape == (3, 6, 10) and torch.equal(out["label"], sample["label"])
    grown = ScaleImage(1.5)(sample)  # enlarging: plain bilinear, as RandomScale resizes
    assert torch.equal(grown["aux"], F.interpolate(sample["aux"][None], size=(18, 30), mode="bilinear")[0])


def test_image_scale_must_be_a_finite_positive_number() -> None:
    assert default_train_config("nyudv2").image_scale == 1.0
    for bad in (0, -0.5, float("nan"), float("inf"), True, "0.5", None):
        with pytest.raises(ValueError, match="image_scale must be a finite number > 0"):
            TrainTransformConfig(crop_size=(4, 4), image_scale=bad)
