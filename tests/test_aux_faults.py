"""Simulated aux-sensor faults, each checked against what it claims to do, and the robustness
benchmark end to end on a tiny budget."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import robustness
from gopt_adapter.data.aux_faults import HOLE_BLOCK, ROBUSTNESS_FAULTS, AuxFault, FaultyAux
from gopt_adapter.baselines import AUX_DROPOUT


def image(seed: int = 0, shape=(2, 24, 36)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_clean_and_missing_leave_the_image_alone():
    aux = image()
    assert AuxFault("clean").apply(aux) is aux and AuxFault("missing").apply(aux) is aux


def test_zeros_and_mean_flatten_each_channel():
    aux = image()
    assert torch.equal(AuxFault("zeros").apply(aux), torch.zeros_like(aux))
    flat = AuxFault("mean").apply(aux)
    for c in range(aux.shape[0]):
        assert torch.allclose(flat[c], torch.full_like(flat[c], aux[c].mean().item()))


def test_noise_has_the_requested_spread_and_follows_the_generator():
    aux = image(shape=(1, 200, 200))
    fault = AuxFault("noise", 0.3)
    noisy = fault.apply(aux, torch.Generator().manual_seed(5))
    difference = noisy - aux
    assert abs(difference.std().item() - 0.3) < 0.01 and abs(difference.mean().item()) < 0.01
    assert torch.equal(noisy, fault.apply(aux, torch.Generator().manual_seed(5)))
    assert not torch.equal(noisy, fault.apply(aux, torch.Generator().manual_seed(6)))


def test_holes_are_squares_at_the_image_minimum_at_the_requested_rate():
    aux = image(shape=(1, 400, 400))
    aux[0, 0, 0] = aux.min() - 1  # the one pixel at the minimum, in the first square
    holed = AuxFault("holes", 0.25).apply(aux, torch.Generator().manual_seed(0))
    hit = holed == aux.min()  # [1, H, W]
    assert torch.equal(holed[~hit], aux[~hit])
    blocks = hit[0].reshape(400 // HOLE_BLOCK, HOLE_BLOCK, 400 // HOLE_BLOCK, HOLE_BLOCK)
    per_block = blocks.sum(dim=(1, 3)).flatten()[1:]  # the first square holds the minimum anyway
    assert set(per_block.unique().tolist()) <= {0, HOLE_BLOCK * HOLE_BLOCK}  # whole squares only
    share = (per_block > 0).float().mean().item()
    assert abs(share - 0.25) < 4 * (0.25 * 0.75 / per_block.numel()) ** 0.5


def test_holes_cover_images_whose_size_is_not_a_multiple_of_the_square():
    aux = image(shape=(1, 10, 7)) + 10
    holed = AuxFault("holes", 1.0).apply(aux, torch.Generator().manual_seed(0))
    assert holed.shape == aux.shape and torch.all(holed == aux.min())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_shift_moves_the_image_right_and_down_and_repeats_the_edges(k):
    aux = image()
    shifted = AuxFault("shift", k).apply(aux)
    assert shifted.shape == aux.shape
    assert torch.equal(shifted[:, k:, k:], aux[:, :-k, :-k])
    assert torch.equal(shifted[:, :k, k:], aux[:, :1, :-k].expand(-1, k, -1))  # top rows repeat row 0
    assert torch.equal(shifted[:, k:, :k], aux[:, :-k, :1].expand(-1, -1, k))  # left columns repeat column 0


@pytest.mark.parametrize("kind, level, message", [
    ("blur", 0, "unknown aux fault"),
    ("zeros", 0.5, "takes no level"),
    ("noise", 0, "standard deviation > 0"),
    ("holes", 1.5, r"rate in \(0, 1\]"),
    ("shift", 1.5, "whole number of pixels"),
    ("shift", float("inf"), "finite number"),
])
def test_bad_faults_are_named(kind, level, message):
    with pytest.raises(ValueError, match=message):
        AuxFault(kind, level)


def test_faulty_dataset_corrupts_each_sample_the_same_way_every_time():
    samples = [{"rgb": torch.zeros(3, 8, 8), "aux": image(i, (1, 8, 8)), "label": torch.zeros(8, 8)} for i in range(3)]
    faulty = FaultyAux(samples, AuxFault("noise", 0.5), seed=1)
    assert len(faulty) == 3
    first, again = faulty[1], faulty[1]
    assert torch.equal(first["aux"], again["aux"]) and not torch.equal(first["aux"], samples[1]["aux"])
    assert not torch.equal(faulty[0]["aux"] - samples[0]["aux"], first["aux"] - samples[1]["aux"])
    assert first["rgb"] is samples[1]["rgb"] and samples[1]["aux"] is not first["aux"]  # source untouched


def test_the_benchmark_conditions_are_those_the_docs_promise():
    names = [fault.name for fault in ROBUSTNESS_FAULTS]
    assert names == ["clean", "missing", "zeros", "mean", "noise 0.1", "noise 0.3", "noise 1",
                     "holes 5%", "holes 11%", "holes 25%", "shift 1 px", "shift 2 px", "shift 4 px"]


def test_robustness_benchmark_runs_reports_and_resumes(tmp_path, capsys):
    tiny = ["--worlds", "depth", "--seeds", "0", "--variants", "foundation", "gopt", "gopt_aux_dropout",
            "--epochs", "1", "--train-length", "16", "--val-length", "4", "--workers", "1",
            "--out", str(tmp_path / "rob"), "--doc", str(tmp_path / "results.md")]
    assert robustness.main(tiny) == 0
    runs = json.loads((tmp_path / "rob" / "results.json").read_text())["runs"]
    by_variant = {r["variant"]: r for r in runs}
    assert set(by_variant) == {"foundation", "gopt", "gopt_aux_dropout"}
    assert by_variant["gopt"]["conditions"]["missing"] is None  # no missing mode without aux_dropout
    assert by_variant["gopt_aux_dropout"]["conditions"]["missing"]["miou"] >= 0
    foundation = by_variant["foundation"]["conditions"]
    assert len({round(c["miou"], 9) for c in foundation.values()}) == 1  # it reads no aux at all
    text = (tmp_path / "results.md").read_text()
    gopt_row = next(line for line in text.splitlines() if line.startswith("| GoPT |"))
    assert gopt_row.split("|")[3].strip() == "-"  # the missing column
    assert f"{100 * by_variant['gopt']['miou']:.1f} ± 0.0" in gopt_row
    split = text[text.index("Without aux on the depth world"):].splitlines()
    split_rows = {line.split("|")[1].strip(): line for line in split[4:] if line.startswith("| ")}
    assert set(split_rows) == {"Foundation (RGB only)", f"GoPT + aux_dropout {AUX_DROPOUT:g}"}  # no GoPT: no mode
    missing = by_variant["gopt_aux_dropout"]["conditions"]["missing"]
    assert split_rows[f"GoPT + aux_dropout {AUX_DROPOUT:g}"].split("|")[2:4] == [
        f" {100 * missing['miou_rgb_classes']:.1f} ± 0.0 ", f" {100 * missing['miou_aux_classes']:.1f} ± 0.0 "]
    capsys.readouterr()
    assert robustness.main(tiny) == 0
    assert "3 runs done before, 0 to go" in capsys.readouterr().err
