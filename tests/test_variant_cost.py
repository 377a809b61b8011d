"""benchmarks.variant_cost: the parameter and compute table of docs/benchmarks.md."""

from __future__ import annotations

from pathlib import Path

import timm
import torch

from benchmarks import variant_cost
from gopt_adapter.baselines import build_variant
from gopt_adapter.parameters import count_parameters

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def section_rows(text):
    body = text[text.index(f"<!-- {variant_cost.SECTION} begin -->"):text.index(f"<!-- {variant_cost.SECTION} end -->")]
    rows = {}
    for line in body.splitlines():
        if line.startswith("| `"):
            cells = [cell.strip() for cell in line.strip("|").split("|")]
            rows[cells[0].strip("`")] = cells
    return rows


def test_the_cost_table_counts_both_ffts_and_twice_the_blocks_for_two_streams(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n\nkept\n")
    assert variant_cost.main(["--variants", "fft", "fft_early", "--model", "vit_tiny_patch16_224", "--size", "64x64",
                              "--classes", "5", "--time-size", "32x32", "--repeats", "1", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nkept\n") and "python -m benchmarks.variant_cost --variants fft" in text
    rows = section_rows(text)
    assert list(rows) == ["foundation", "fft", "fft_early"]
    for name, cells in rows.items():
        with torch.device("meta"):
            count = count_parameters(build_variant(name, timm.create_model("vit_tiny_patch16_224", num_classes=0), 1, 5))
        assert cells[2:4] == [f"{count.trainable:,}", f"{count.total:,}"], name
    assert 1.95 < float(rows["fft"][5]) < 2.0  # every block twice; patch embedding and head once
    assert 1.0 < float(rows["fft_early"][5]) < 1.01
    assert rows["foundation"][5:] == ["1.000", "1.00"]


def test_the_documented_parameters_are_those_of_the_variants_on_vit_b():
    rows = section_rows(DOC.read_text())
    assert {"foundation", "fft", "fft_early"} <= set(rows)
    for name, cells in rows.items():
        with torch.device("meta"):
            count = count_parameters(build_variant(name, timm.create_model("vit_base_patch16_224", num_classes=0), 1, 40))
        assert cells[2:4] == [f"{count.trainable:,}", f"{count.total:,}"], name
