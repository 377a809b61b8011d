"""SegMetrics against hand-computed values and an independent numpy implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gopt_adapter.train.metrics import SegMetrics


def test_hand_computed_three_classes() -> None:
    # ground truth / prediction pairs chosen to give this confusion matrix (rows = gt):
    #   [[3, 1, 0],
    #    [0, 2, 2],
    #    [0, 0, 0]]   class 2 absent from the ground truth but predicted twice
    target = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 255, 255])
    pred = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 1])  # the two ignored pixels may predict anything
    m = SegMetrics(3)
    m.update(pred, target)
    assert m.confmat.tolist() == [[3, 1, 0], [0, 2, 2], [0, 0, 0]]
    r = m.compute()
    assert r["total"] == 8
    assert r["predicted_pixels"] == [3, 3, 2] and r["predicted_classes"] == 3  # ignored pixels not counted
    assert r["pixel_acc"] == pytest.approx(5 / 8) and r["oa"] == r["pixel_acc"]
    assert r["acc"][:2] == pytest.approx([3 / 4, 2 / 4]) and math.isnan(r["acc"][2])
    assert r["mean_acc"] == pytest.approx((3 / 4 + 2 / 4) / 2) and r["aa"] == r["mean_acc"]
    # IoU: class0 3/(4+3-3)=3/4, class1 2/(4+3-2)=2/5, class2 0/(0+2-0)=0 (predicted, absent)
    assert r["iou"] == pytest.approx([3 / 4, 2 / 5, 0.0])
    assert r["miou"] == pytest.approx((3 / 4 + 2 / 5 + 0) / 3)
    p_e = (4 * 3 + 4 * 3 + 0 * 2) / 64
    assert r["kappa"] == pytest.approx((5 / 8 - p_e) / (1 - p_e))


def test_class_absent_from_gt_and_pred_is_left_out() -> None:
    m = SegMetrics(4)
    m.update(torch.tensor([[0, 1], [1, 1]]), torch.tensor([[0, 1], [0, 1]]))
    r = m.compute()
    assert math.isnan(r["iou"][2]) and math.isnan(r["iou"][3])
    assert r["miou"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert r["mean_acc"] == pytest.approx((1 / 2 + 1) / 2)


def test_f1_is_dice_per_class_and_its_mean_skips_classes_absent_from_both() -> None:
    # confusion matrix by hand (rows = gt), 4 classes:
    #   [[2, 1, 0, 0],
    #    [0, 3, 0, 1],
    #    [0, 0, 0, 0],    class 2: neither in the ground truth nor predicted
    #    [0, 0, 0, 0]]    class 3: predicted once, never in the ground truth
    target = torch.tensor([0, 0, 0, 1, 1, 1, 1, 255])
    pred = torch.tensor([0, 0, 1, 1, 1, 1, 3, 2])  # the ignored pixel's prediction does not count
    m = SegMetrics(4)
    m.update(pred, target)
    assert m.confmat.tolist() == [[2, 1, 0, 0], [0, 3, 0, 1], [0, 0, 0, 0], [0, 0, 0, 0]]
    r = m.compute()
    # F1 = 2 TP / (2 TP + FP + FN): class 0: 2*2 / (4 + 0 + 1) = 4/5; class 1: 2*3 / (6 + 1 + 1) = 3/4;
    # class 3: 0 / (0 + 1 + 0) = 0 (predicted, absent: counts); class 2: 0/0, left out as its IoU is
    assert r["f1"][0] == pytest.approx(4 / 5) and r["f1"][1] == pytest.approx(3 / 4) and r["f1"][3] == 0.0
    assert math.isnan(r["f1"][2]) and math.isnan(r["iou"][2])
    assert r["mean_f1"] == pytest.approx((4 / 5 + 3 / 4 + 0) / 3)
    assert math.isnan(SegMetrics(2).compute()["mean_f1"])


def test_perfect_and_single_class() -> None:
    m = SegMetrics(2)
    m.update(torch.zeros(3, 4, dtype=torch.long), torch.zeros(3, 4, dtype=torch.long))
    r = m.compute()
    assert r["miou"] == 1.0 and r["oa"] == 1.0 and r["kappa"] == 1.0
    assert r["predicted_classes"] == 1 and r["predicted_pixels"] == [12, 0]


def test_empty_is_nan_and_errors() -> None:
    r = SegMetrics(3).compute()
    assert math.isnan(r["miou"]) and r["total"] == 0 and r["predicted_classes"] == 0
    m = SegMetrics(3)
    with pytest.raises(ValueError, match="shapes differ"):
        m.update(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="class ids"):
        m.update(torch.tensor([3]), torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        m.update(torch.zeros(2), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="ignore_index"):
        SegMetrics(300, ignore_index=255)


def test_leading_dims_accumulate_and_merge() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (2, 3, 7, 9), generator=g)
    pred = torch.randint(0, 5, (2, 3, 7, 9), generator=g)
    whole = SegMetrics(5)
    whole.update(pred, target)
    parts = [SegMetrics(5), SegMetrics(5)]
    parts[0].update(pred[0], target[0])
    parts[1].update(pred[1].flatten(), target[1].flatten())
    assert torch.equal((parts[0] + parts[1]).confmat, whole.confmat)
    merged = SegMetrics(5).merge(parts[0]).merge(parts[1])
    assert merged.compute() == whole.compute()
    whole.reset()
    assert int(whole.confmat.sum()) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_runs_on_input_device() -> None:
    m = SegMetrics(3)
    m.update(torch.tensor([0, 1, 2], device="cuda"), torch.tensor([0, 1, 1], device="cuda"))
    assert m.confmat.device.type == "cuda"
    assert m.compute()["oa"] == pytest.approx(2 / 3)


def numpy_metrics(pred: np.ndarray, target: np.ndarray, k: int) -> dict:
    """Independent reference: explicit loops over pixels, formulas from docs/datasets.md."""
    cm = np.zeros((k, k), dtype=np.int64)
    for t, p in zip(target.ravel(), pred.ravel()):
        if 0 <= t < k:
            cm[t, p] += 1
    total = cm.sum()
    accs, ious, f1s = [], [], []
    for c in range(k):
        row, col, tp = cm[c, :].sum(), cm[:, c].sum(), cm[c, c]
        accs.append(tp / row if row else np.nan)
        ious.append(tp / (row + col - tp) if row + col - tp else np.nan)
        f1s.append(2 * tp / (2 * tp + (col - tp) + (row - tp)) if row + col else np.nan)  # 2TP / (2TP + FP + FN)
    p_o = np.trace(cm) / total
    p_e = sum(cm[c, :].sum() * cm[:, c].sum() for c in range(k)) / total**2
    return {
        "oa": p_o,
        "mean_acc": np.nanmean(accs),
        "iou": ious,
        "miou": np.nanmean(ious),
        "f1": f1s,
        "mean_f1": np.nanmean(f1s),
        "kappa": 1.0 if p_e == 1 else (p_o - p_e) / (1 - p_e),
    }


@settings(max_examples=40, deadline=None)
@given(
    k=st.integers(1, 6),
    n=st.integers(1, 200),
    ignore_frac=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_numpy_reference(k: int, n: int, ignore_frac: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, n)
    target[rng.random(n) < ignore_frac] = 255
    # bias predictions towards the truth so that all regimes (good and bad) occur
    pred = np.where(rng.random(n) < rng.random(), np.clip(target, 0, k - 1), rng.integers(0, k, n))
    m = SegMetrics(k)
    m.update(torch.from_numpy(pred), torch.from_numpy(target))
    ours = m.compute()
    if not (target != 255).any():
        assert ours["total"] == 0 and math.isnan(ours["miou"])
        return
    ref = numpy_metrics(pred, target, k)
    for key in ("oa", "mean_acc", "miou", "mean_f1", "kappa"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    np.testing.assert_allclose(ours["iou"], ref["iou"], atol=1e-12)
    np.testing.assert_allclose(ours["f1"], ref["f1"], atol=1e-12)
    iou = np.array(ours["iou"])
    np.testing.assert_allclose(ours["f1"], 2 * iou / (1 + iou), atol=1e-12)  # Dice = 2 IoU / (1 + IoU)
    assert ours["pixel_acc"] == ours["oa"] and ours["aa"] == ours["mean_acc"]
    for key in ("oa", "mean_acc", "miou", "mean_f1"):
        assert 0.0 <= ours[key] <= 1.0
    assert -1.0 <= ours["kappa"] <= 1.0

