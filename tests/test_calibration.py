"""Decision calibration of the aux-missing mode: the offsets reach the label frequencies, move
only the classes the model cannot tell apart, and act on missing samples alone."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model_helpers import family_inputs, make_backbone, perturb_adapter
from gopt_adapter import apply_gopt, calibrate_missing_mode, load_adapter, save_adapter
from gopt_adapter.calibration import fit_class_offsets


def shares(logits: torch.Tensor, num_classes: int) -> torch.Tensor:
    return torch.bincount(logits.argmax(1), minlength=num_classes).float() / logits.shape[0]


def test_offsets_split_two_indistinguishable_classes_and_leave_a_clear_one_alone():
    """Classes 0 and 1 look alike (0 always wins by 0.3 before calibration); class 2 is clear."""
    generator = torch.Generator().manual_seed(0)
    n = 6000
    labels = torch.tensor([0, 1, 2]).repeat_interleave(n // 3)
    logits = torch.zeros(n, 3)
    ambiguous = labels < 2
    logits[ambiguous, 0] = 2.3 + 0.05 * torch.randn(int(ambiguous.sum()), generator=generator)
    logits[ambiguous, 1] = 2.0 + 0.05 * torch.randn(int(ambiguous.sum()), generator=generator)
    logits[~ambiguous, 2] = 5.0
    assert shares(logits, 3).tolist() == pytest.approx([2 / 3, 0, 1 / 3])  # class 1 never predicted
    bias = fit_class_offsets(logits, labels, 3)
    assert shares(logits + bias, 3).tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3], abs=0.01)
    assert torch.equal((logits + bias).argmax(1)[~ambiguous], labels[~ambiguous])
    assert bias.sum().abs() < 1e-5  # centred


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), num_classes=st.integers(2, 6), scale=st.floats(0.2, 5.0))
def test_offsets_match_the_label_shares_and_absorb_a_per_class_shift(seed, num_classes, scale):
    """On continuous logits the calibrated argmax predicts every class as often as it is labelled,
    and shifting class c's logits by s_c shifts its offset by -s_c (up to the common centring)."""
    generator = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(4000, num_classes, generator=generator)
    labels = torch.randint(num_classes, (4000,), generator=generator)
    target = torch.bincount(labels, minlength=num_classes).float() / 4000
    bias = fit_class_offsets(logits, labels, num_classes, tau=0.01 * scale)
    assert (shares(logits + bias, num_classes) - target).abs().max() < 0.01
    shift = torch.randn(num_classes, generator=generator)
    moved = fit_class_offsets(logits + shift, labels, num_classes, tau=0.01 * scale)
    torch.testing.assert_close(moved, bias - (shift - shift.mean()), atol=0.02 * scale, rtol=0)


@pytest.mark.parametrize("logits, labels, message", [
    (torch.zeros(4, 2), torch.zeros(4, dtype=torch.long), r"logits must be \[N, 3\]"),
    (torch.zeros(4, 3), torch.zeros(5, dtype=torch.long), r"labels must be \[N\] = \[4\]"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), "no labelled pixels"),
    (torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]), r"labels must lie in \[0, 3\)"),
])
def test_bad_calibration_inputs_are_named(logits, labels, message):
    with pytest.raises(ValueError, match=message):
        fit_class_offsets(logits, labels, 3)


def robust_segmenter():
    segmenter = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=4, hidden_dim=8,
                           head_channels=16, aux_dropout=0.3)
    perturb_adapter(segmenter, std=0.2)
    return segmenter.eval()


def labelled_samples(count=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    rgb, aux = family_inputs("vit", batch=count)
    labels = torch.randint(4, (count, *rgb.shape[-2:]), generator=generator)
    labels[:, 0, :3] = 255  # ignored pixels are never counted
    return [{"rgb": rgb[i], "aux": aux[i], "label": labels[i]} for i in range(count)]


def test_calibration_moves_only_missing_samples_logits_and_is_saved(tmp_path):
    segmenter = robust_segmenter()
    samples = labelled_samples()
    rgb, aux = family_inputs("vit", batch=3)
    missing = torch.tensor([True, False, True])
    old_bias = segmenter.adapter.missing_logit_bias.clone()  # perturbed: the fit starts from zero anyway
    with torch.no_grad():
        before_missing, before_clean = segmenter(rgb, None), segmenter(rgb, aux)
        report = calibrate_missing_mode(segmenter, samples)
        after_missing, after_clean = segmenter(rgb, None), segmenter(rgb, aux)
        mixed = segmenter(rgb, aux, missing)
    bias = segmenter.adapter.missing_logit_bias
    assert torch.equal(bias, report.bias) and bias.abs().max() > 0
    assert report.pixels == sum(int((s["label"] != 255).sum()) for s in samples)
    torch.testing.assert_close(after_missing, before_missing + (bias - old_bias).view(1, -1, 1, 1))
    assert torch.equal(after_clean, before_clean)  # aux present: untouched
    torch.testing.assert_close(mixed[missing], after_missing[missing])
    assert torch.equal(mixed[~missing], after_clean[~missing])
    assert (report.after - report.target).abs().sum() <= (report.before - report.target).abs().sum()
    path = save_adapter(segmenter, tmp_path / "robust.safetensors")
    fresh = robust_segmenter()
    load_adapter(fresh, path)
    assert torch.equal(fresh.adapter.missing_logit_bias, bias)


def test_calibration_refuses_an_adapter_without_missing_mode_and_keeps_the_bias_on_failure():
    plain = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=4)
    with pytest.raises(ValueError, match="no aux-missing mode to calibrate"):
        calibrate_missing_mode(plain, labelled_samples())
    segmenter = robust_segmenter()
    with torch.no_grad():
        segmenter.adapter.missing_logit_bias.copy_(torch.tensor([0.5, -0.5, 0.0, 0.0]))
    broken = labelled_samples()
    broken[3] = {"rgb": broken[3]["rgb"]}  # no label
    segmenter.train()
    with pytest.raises(KeyError):
        calibrate_missing_mode(segmenter, broken)
    assert segmenter.adapter.missing_logit_bias.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert segmenter.training  # the mode it was in
    unlabelled = labelled_samples()
    for sample in unlabelled:
        sample["label"] = torch.full_like(sample["label"], 255)  # every pixel ignored: the fit fails
    with pytest.raises(ValueError, match="no labelled pixels"):
        calibrate_missing_mode(segmenter, unlabelled)
    assert segmenter.adapter.missing_logit_bias.tolist() == [0.5, -0.5, 0.0, 0.0]
    assert segmenter.training
