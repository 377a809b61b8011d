"""``train.loss``: cross-entropy, ENet-weighted cross-entropy and OHEM against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from gopt_adapter.train.engine import TrainConfig, Trainer
from gopt_adapter.train.losses import build_loss, count_labels, enet_class_weights, ohem_cross_entropy

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

LN = math.log
# One image of 1 x 5 pixels, 2 classes: the probability of each pixel's class is set by its logits.
#   pixel 0: logits (0, ln 3), class 0: p = 1/4     pixel 1: (0, 0), class 1: p = 1/2
#   pixel 2: (0, ln 3), class 1: p = 3/4            pixel 3: (0, ln 9), class 1: p = 9/10
#   pixel 4: ignored (its logits must not matter)
LOGITS = torch.tensor([[[[0.0, 0.0, 0.0, 0.0, 5.0]], [[LN(3), 0.0, LN(3), LN(9), -5.0]]]])  # [1, 2, 1, 5]
TARGET = torch.tensor([[[0, 1, 1, 1, 255]]])  # [1, 1, 5]
PIXEL_LOSS = [LN(4), LN(2), LN(4 / 3), LN(10 / 9)]  # -ln p of pixels 0..3


def test_ce_is_the_mean_over_the_labelled_pixels():
    loss = build_loss("ce")(LOGITS, TARGET)
    assert float(loss) == pytest.approx(sum(PIXEL_LOSS) / 4, rel=1e-6)


def test_ce_weighted_divides_by_the_weights_of_the_targets():
    loss = build_loss("ce_weighted", torch.tensor([2.0, 0.5]))(LOGITS, TARGET)
    # targets 0, 1, 1, 1: (2 ln 4 + 0.5 (ln 2 + ln 4/3 + ln 10/9)) / (2 + 3 * 0.5)
    expected = (2 * LN(4) + 0.5 * (LN(2) + LN(4 / 3) + LN(10 / 9))) / 3.5
    assert float(loss) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("thresh, min_kept, kept", [
    (0.7, 1, [0, 1]),  # p = 1/4 and 1/2 are below 0.7
    (0.7, 3, [0, 1, 2]),  # only two below: the three hardest
    (0.3, 1, [0]),
    (0.95, 1, [0, 1, 2, 3]),  # every pixel below 0.95
    (1.0, 1, [0, 1, 2, 3]),
    (0.7, 100, [0, 1, 2, 3]),  # more than the valid pixels: all of them, the ignored one still left out
])
def test_ohem_keeps_the_pixels_below_thresh_but_at_least_min_kept(thresh, min_kept, kept):
    loss = build_loss("ohem", ohem_thresh=thresh, ohem_min_kept=min_kept)(LOGITS, TARGET)
    assert float(loss) == pytest.approx(sum(PIXEL_LOSS[i] for i in kept) / len(kept), rel=1e-6)


def test_ohem_counts_a_certain_pixel_among_the_min_kept_before_any_ignored_one():
    """A pixel predicted with certainty has loss exactly 0 in float32, as ignored pixels do: it
    must still be one of the ``min_kept``, so that it counts in the mean."""
    logits = torch.tensor([[[[0.0, 0.0, 0.0, 0.0, 100.0]], [[LN(3), 0.0, 0.0, 0.0, 0.0]]]])  # [1, 2, 1, 5]
    target = torch.tensor([[[0, 255, 255, 255, 0]]])  # p = 1/4, three ignored, p = 1 (loss 0)
    assert float(ohem_cross_entropy(logits, target, thresh=0.7, min_kept=2)) == pytest.approx(LN(4) / 2, rel=1e-6)


def test_ohem_sends_gradient_only_through_the_kept_pixels():
    logits = LOGITS.clone().requires_grad_(True)
    ohem_cross_entropy(logits, TARGET, thresh=0.7, min_kept=1).backward()
    moved = logits.grad.abs().sum(1).flatten() > 0  # [5]
    assert moved.tolist() == [True, True, False, False, False]
    # d/dz of (ln(1 + e^{z1 - z0}) + ...) / 2 for pixel 0, class 0: (p0 - 1) / 2 = (1/4 - 1) / 2
    assert float(logits.grad[0, 0, 0, 0]) == pytest.approx(-3 / 8, rel=1e-6)


def test_a_batch_without_a_labelled_pixel_is_what_cross_entropy_makes_of_it_for_every_loss():
    """NaN with zero, finite gradients, as ``F.cross_entropy``: the trainer skips and counts such a
    step alike whichever loss runs (engine: a non-finite step)."""
    target = torch.full_like(TARGET, 255)
    for loss_fn in (build_loss("ce"), build_loss("ce_weighted", torch.tensor([2.0, 0.5])), build_loss("ohem")):
        logits = LOGITS.clone().requires_grad_(True)
        loss = loss_fn(logits, target)
        loss.backward()
        assert math.isnan(loss.item()) and torch.equal(logits.grad, torch.zeros_like(logits))


def test_counts_leave_out_the_ignored_pixels_and_refuse_other_values():
    labels = [torch.tensor([[0, 0, 1], [255, 0, 1]]), torch.tensor([1, 1, 255])]
    assert count_labels(labels, 3).tolist() == [3, 4, 0]
    with pytest.raises(ValueError):
        count_labels([torch.tensor([0, 3])], 3)


def test_enet_weights_by_hand_with_an_absent_class_finite():
    weights = enet_class_weights(torch.tensor([30, 10, 0]))  # shares 0.75, 0.25, 0
    expected = [1 / LN(1.02 + 0.75), 1 / LN(1.02 + 0.25), 1 / LN(1.02)]  # 1.752, 4.184, 50.50
    assert weights.tolist() == pytest.approx(expected, rel=1e-6)
    assert expected[2] == pytest.approx(50.4983, abs=1e-4)
    with pytest.raises(ValueError):
        enet_class_weights(torch.tensor([0, 0, 0]))


# ------------------------------------------------------------------------- invariants
def batches(draw_easy: bool):
    """Logits ``[B, K, H, W]`` and targets with some ignored pixels; with ``draw_easy`` every
    labelled pixel's class leads by >= 5, so p >= e^4 / (e^4 + 3) > 0.94 for K <= 4."""

    @st.composite
    def build(draw):
        b, k, h, w = draw(st.integers(1, 2)), draw(st.integers(2, 4)), draw(st.integers(1, 4)), draw(st.integers(1, 5))
        seed = draw(st.integers(0, 2**31 - 1))
        generator = torch.Generator().manual_seed(seed)
        target = torch.randint(0, k, (b, h, w), generator=generator)
        target[torch.rand(b, h, w, generator=generator) < draw(st.floats(0.0, 0.5))] = 255
        logits = torch.randn(b, k, h, w, generator=generator) * draw(st.floats(0.1, 4.0))
        if draw_easy:
            logits = torch.rand(b, k, h, w, generator=generator)
            logits.scatter_add_(1, target.clamp(max=k - 1)[:, None], torch.full((b, 1, h, w), 5.0))
        return logits, target

    return build()


def numpy_pixel_losses(logits: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """-log softmax of each labelled pixel's class, in float64, from the definition."""
    z = logits.double().numpy().transpose(0, 2, 3, 1).reshape(-1, logits.shape[1])  # [N, K]
    t = target.numpy().reshape(-1)
    z, t = z[t != 255], t[t != 255]
    return np.log(np.exp(z).sum(1)) - z[np.arange(len(t)), t]


@settings(max_examples=40, deadline=None)
@given(batch=batches(False), thresh=st.floats(0.05, 1.0), extra=st.integers(0, 5))
def test_ohem_with_min_kept_over_the_labelled_pixels_is_plain_cross_entropy(batch, thresh, extra):
    logits, target = batch
    valid = int((target != 255).sum())
    ohem = ohem_cross_entropy(logits, target, thresh=thresh, min_kept=max(valid, 1) + extra)
    plain = F.cross_entropy(logits, target, ignore_index=255)
    assert torch.equal(ohem, plain) or (math.isnan(float(ohem)) and math.isnan(float(plain)))


@settings(max_examples=40, deadline=None)
@given(batch=batches(True), data=st.data())
def test_ohem_on_easy_pixels_keeps_exactly_the_min_kept_hardest(batch, data):
    logits, target = batch
    losses = numpy_pixel_losses(logits, target)
    if losses.size == 0:
        return
    min_kept = data.draw(st.integers(1, losses.size))
    logits.requires_grad_(True)
    loss = ohem_cross_entropy(logits, target, thresh=0.7, min_kept=min_kept)
    loss.backward()
    assert int((logits.grad.abs().sum(1) > 0).sum()) == min_kept  # the pixels that count
    assert loss.item() == pytest.approx(np.sort(losses)[::-1][:min_kept].mean(), rel=1e-5, abs=1e-6)  # float32 log-softmax


@settings(max_examples=40, deadline=None)
@given(batch=batches(False), thresh=st.floats(0.05, 1.0), min_kept=st.integers(1, 50))
def test_ohem_lies_between_the_mean_and_the_largest_pixel_loss(batch, thresh, min_kept):
    logits, target = batch
    losses = numpy_pixel_losses(logits, target)
    if losses.size == 0:
        return
    ohem = float(ohem_cross_entropy(logits, target, thresh=thresh, min_kept=min_kept))
    assert losses.mean() - 1e-5 <= ohem <= losses.max() + 1e-5  # the mean of a hardest subset


# ------------------------------------------------------------------------- settings
@pytest.mark.parametrize("bad", [
    dict(loss="focal"), dict(loss="ohem", ohem_thresh=0.0), dict(loss="ohem", ohem_thresh=1.5),
    dict(loss="ohem", ohem_min_kept=0), dict(loss="ohem", ohem_min_kept=2.5),
    dict(ohem_thresh=0.5), dict(loss="ce_weighted", ohem_min_kept=10),  # ohem settings without ohem
])
def test_loss_settings_are_validated(bad):
    with pytest.raises(ValueError):
        TrainConfig(**bad)


def test_class_weights_go_with_ce_weighted_only(tmp_path):
    from model_helpers import make_backbone
    from gopt_adapter import apply_gopt
    from gopt_adapter.data import get_dataset

    train = get_dataset("synthetic", split="train", mode="depth", size=32, length=8)
    model = apply_gopt(make_backbone("vit", depth=2), 1, train.num_classes, hidden_dim=8)
    k = train.num_classes

    def trainer(loss, weights):
        return Trainer(model, train, k, TrainConfig(epochs=1, batch_size=8, loss=loss, progress=False), tmp_path,
                       device="cpu", class_weights=weights)

    with pytest.raises(ValueError):
        build_loss("ce_weighted")
    for loss, weights in (("ce_weighted", None), ("ce", torch.ones(k)), ("ohem", torch.ones(k)),
                          ("ce_weighted", torch.ones(k + 1)), ("ce_weighted", torch.tensor([1.0] * (k - 1) + [0.0]))):
        with pytest.raises(ValueError):
            trainer(loss, weights)
    trainer("ce_weighted", torch.ones(k))  # the pair that fits


@pytest.mark.parametrize("loss", ["ce_weighted", "ohem"])
def test_gopt_train_takes_the_loss_and_records_the_weights_of_the_training_labels(tmp_path, loss):
    from datasets_helpers import make_folder
    from gopt_adapter.cli.commands import main
    from test_folder import TRAIN

    written = make_folder(tmp_path / "data", {"train": 4, "val": 1})
    out = tmp_path / "run"
    assert main(["train", "--dataset", "folder", "--root", str(tmp_path / "data"), "--random-init", "--out", str(out),
                 "--set", f"train.loss={loss}", *TRAIN]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["train"]["loss"] == loss
    if loss == "ohem":
        assert record["class_weights"] is None
        assert (record["config"]["train"]["ohem_thresh"], record["config"]["train"]["ohem_min_kept"]) == (0.7, 100_000)
        return
    labels = np.concatenate([entry["label"].ravel() for stem, entry in written.items() if stem.startswith("train")])
    pixels = [int((labels == k).sum()) for k in range(3)]  # the 255 corners left out
    assert record["class_weights"]["pixels"] == pixels
    shares = [p / sum(pixels) for p in pixels]
    assert record["class_weights"]["weights"] == pytest.approx([1 / LN(1.02 + s) for s in shares], rel=1e-6)
