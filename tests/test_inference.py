"""Sliding windows and test-time augmentation: the one implementation eval and predict share."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gopt_adapter import apply_gopt
from gopt_adapter.data import get_dataset
from gopt_adapter.train.engine import evaluate
from gopt_adapter.inference import TTAConfig, sliding_window_logits, tta_scores, view_size, window_starts
from gopt_adapter.data.transforms import build_transforms
from gopt_adapter.resize import resize_logits
from model_helpers import PixelModel, make_backbone, perturb_adapter


@pytest.mark.parametrize("height, width", [(37, 53), (16, 70), (64, 48), (5, 5)])
@pytest.mark.parametrize("window, stride", [(16, 16), (16, 8), (16, 1), (40, 40), (20, 7), (16, None), (9, 9)])
def test_sliding_window_equals_full_image_for_a_per_pixel_model(height, width, window, stride):
    model = PixelModel()
    rgb, aux = torch.randn(2, 3, height, width), torch.randn(2, 1, height, width)
    with torch.no_grad():
        full = model(rgb, aux)
        windowed = sliding_window_logits(model, rgb, aux, 3, window, stride)
    assert not windowed.isnan().any()
    torch.testing.assert_close(windowed, full)


@pytest.mark.parametrize("window, stride", [(16, 17), (16, 0), (16, -1), (0, None)])
def test_sliding_window_refuses_uncovering_strides(window, stride):
    rgb, aux = torch.randn(1, 3, 40, 40), torch.randn(1, 1, 40, 40)
    with pytest.raises(ValueError, match="window"):
        sliding_window_logits(PixelModel(), rgb, aux, 3, window, stride)


@settings(max_examples=200, deadline=None)
@given(size=st.integers(1, 300), window=st.integers(1, 64), data=st.data())
def test_windows_cover_every_pixel_and_end_at_the_border(size, window, data):
    stride = data.draw(st.integers(1, window))
    starts = window_starts(size, window, stride)
    covered = torch.zeros(size, dtype=torch.bool)
    for start in starts:
        covered[start:start + window] = True
    assert covered.all()
    assert starts[0] == 0 and min(starts[-1] + window, size) == size
    assert all(0 <= s and (s + window <= size or size <= window) for s in starts)
    assert all(0 < b - a <= stride for a, b in zip(starts, starts[1:]))


# ----------------------------------------------------------------------------- TTA
class Recorder(torch.nn.Module):
    """A position-dependent model (logits rise left to right for class 0, fall for class 1, and
    follow the rgb's first channel for class 2) that records the inputs it sees."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, rgb, aux):
        self.seen.append((tuple(rgb.shape[-2:]), rgb.clone(), aux.clone()))
        ramp = torch.linspace(-1, 1, rgb.shape[-1]).expand_as(rgb[:, 0])  # [B, H, W]
        return torch.stack([ramp, -ramp, rgb[:, 0]], 1)  # [B, 3, H, W]


def test_tta_config_validates_and_lists_its_views():
    assert TTAConfig().scales == (0.75, 1.0, 1.25) and not TTAConfig().flip
    config = TTAConfig([2, 0.5], flip=True)
    assert config.scales == (2.0, 0.5) and config.views == [(2.0, False), (2.0, True), (0.5, False), (0.5, True)]
    for bad in ([], (0,), (-1.0,), (math.nan,), (math.inf,), ("1",), (True,), (1, 1.0), "1"):
        with pytest.raises(ValueError):
            TTAConfig(bad)
    with pytest.raises(ValueError):
        TTAConfig((1,), flip="yes")


def test_view_sizes_keep_scale_one_and_round_other_scales_up_to_the_multiple():
    assert view_size((21, 30), 1.0, (8, 8)) == (21, 30)  # the input as it is, whatever its size
    assert view_size((20, 30), 0.75, (4, 4)) == (16, 24)  # 15 x 22 (rounded half to even), up to multiples of 4
    assert view_size((20, 30), 1.25, (1, 1)) == (25, 38)


def test_a_single_view_returns_the_models_logits_bit_for_bit():
    """Scales [1], no flip: plain inference exactly, for a GoPT segmenter too, at the input size
    and resized to a larger label size (an adapter trained with image_scale)."""
    torch.manual_seed(0)
    segmenter = apply_gopt(make_backbone("vit"), 1, 4, hidden_dim=8, head_channels=16).eval()
    perturb_adapter(segmenter)
    rgb, aux = torch.randn(1, 3, 32, 48), torch.randn(1, 1, 32, 48)
    with torch.no_grad():
        plain = segmenter(rgb, aux)
        assert torch.equal(tta_scores(segmenter, rgb, aux, (32, 48), TTAConfig((1,))), plain)
        assert torch.equal(tta_scores(segmenter, rgb, aux, (64, 96), TTAConfig((1,))), resize_logits(plain, (64, 96)))


def test_flipped_views_are_mirrored_back_and_the_softmax_is_averaged():
    model = Recorder()
    rgb, aux = torch.randn(2, 3, 8, 12), torch.randn(2, 1, 8, 12)
    scores = tta_scores(model, rgb, aux, (8, 12), TTAConfig((1,), flip=True))
    (_, rgb0, aux0), (_, rgb1, aux1) = model.seen
    assert torch.equal(rgb0, rgb) and torch.equal(rgb1, rgb.flip(-1)) and torch.equal(aux1, aux.flip(-1))
    ramp = torch.linspace(-1, 1, 12).expand(2, 8, 12)
    mirrored_ramp = ramp.flip(-1)  # what the mirrored view's class-0 logits are, mirrored back
    expected = (torch.stack([ramp, -ramp, rgb[:, 0]], 1).softmax(1)
                + torch.stack([mirrored_ramp, -mirrored_ramp, rgb[:, 0]], 1).softmax(1)) / 2
    torch.testing.assert_close(scores, expected)
    torch.testing.assert_close(scores.sum(1), torch.ones(2, 8, 12))


def test_scaled_views_resize_rgb_and_aux_and_come_back_at_the_output_size():
    model = Recorder()
    rgb, aux = torch.randn(1, 3, 20, 30), torch.randn(1, 1, 20, 30)
    scores = tta_scores(model, rgb, aux, (40, 60), TTAConfig((0.75, 1, 1.25)), multiple=(4, 4))
    assert [shape for shape, _, _ in model.seen] == [(16, 24), (20, 30), (28, 40)]
    assert all(seen_aux.shape[-2:] == seen_rgb.shape[-2:] for _, seen_rgb, seen_aux in model.seen)
    assert scores.shape == (1, 3, 40, 60)
    torch.testing.assert_close(scores.sum(1), torch.ones(1, 40, 60))


def test_constant_logits_average_to_their_own_softmax_over_any_views():
    logits = torch.tensor([2.0, -1.0, 0.5])

    def constant(rgb, aux):
        return logits.view(1, 3, 1, 1).expand(rgb.shape[0], 3, *rgb.shape[-2:])

    rgb, aux = torch.randn(1, 3, 10, 14), torch.randn(1, 1, 10, 14)
    scores = tta_scores(constant, rgb, aux, (10, 14), TTAConfig((0.5, 1, 1.5), flip=True))
    torch.testing.assert_close(scores, logits.softmax(0).view(1, 3, 1, 1).expand(1, 3, 10, 14))


def synthetic_val():
    return get_dataset("synthetic", split="val", mode="depth", size=24, length=3, seed=0,
                       transform=build_transforms("synthetic", False))


def test_evaluate_with_flip_changes_nothing_for_a_flip_equivariant_model_and_something_otherwise():
    torch.manual_seed(0)
    data = synthetic_val()
    equivariant = PixelModel()  # a 1x1 convolution: mirrored input, mirrored output
    plain = evaluate(equivariant, data, 3)
    assert evaluate(equivariant, data, 3, tta=TTAConfig((1,), flip=True)) == plain
    assert evaluate(equivariant, data, 3, tta=TTAConfig((1,))) == plain
    position = Recorder()  # its class 0/1 logits depend on the column: the mirrored view disagrees
    assert evaluate(position, data, 3, tta=TTAConfig((1,), flip=True)) != evaluate(position, data, 3)


def test_evaluate_hands_every_prediction_to_the_callback_in_order():
    data = synthetic_val()
    seen = []
    metrics = evaluate(PixelModel(), data, 3, on_prediction=lambda index, pred, label: seen.append((index, pred, label)))
    assert [index for index, _, _ in seen] == [0, 1, 2]
    assert all(torch.equal(label, data[index]["label"]) and pred.shape == label.shape for index, pred, label in seen)
    assert sum(int((label < 3).sum()) for _, _, label in seen) == metrics["total"]
