"""The synthetic ablation (benchmarks.ablation) end to end on a tiny budget, and its resume."""

from __future__ import annotations

import json

from benchmarks import ablation, suite

TINY = ["--worlds", "depth", "--seeds", "0", "--variants", "gopt", "vpt_shallow", "gopt_soft", "fft", "fft_early",
        "--epochs", "1", "--train-length", "32", "--val-length", "8", "--workers", "1"]


def test_ablation_runs_reports_and_resumes(tmp_path, capsys):
    out, doc = tmp_path / "abl", tmp_path / "results.md"
    assert ablation.main([*TINY, "--out", str(out), "--doc", str(doc)]) == 0
    text = doc.read_text()
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert {(r["variant"], r["seed"]) for r in runs} == {(v, 0) for v in ("gopt", "vpt_shallow", "gopt_soft", "fft", "fft_early")}
    for record in runs:
        assert 0 <= record["miou"] <= 1 and record["rgb_only_bound"] > 0.6
        assert (out / "depth" / f"{record['variant']}_s0.json").exists()
    assert (out / "depth" / "foundation_vit_s0.safetensors").exists()
    row = next(line for line in text.splitlines() if line.startswith(f"| {suite.GOPT_OURS} |"))
    gopt = next(r for r in runs if r["variant"] == "gopt")
    assert f"{gopt['trainable_parameters']:,}" in row and f"{100 * gopt['miou']:.1f} ± 0.0" in row
    assert "| 54.1 |" in row  # the paper's NYUDv2 mIoU for GoPT, beside ours
    assert "| soft |" in text and "## Fig. 6" in text
    fft = next(line for line in text.splitlines() if line.startswith("| FFT (two streams, CEN exchange) |"))
    assert "| 53.1 |" in fft  # the paper's NYUDv2 mIoU for FFT
    # demo backbone: width 96, 4 blocks: 9 LayerNorms, 4 of each 48-channel share exchanged (exchange_ratio 0.1)
    exchanged = next(r for r in runs if r["variant"] == "fft")["exchanged_channels"]
    assert exchanged["rgb"] >= 36 and exchanged["aux"] >= 36 and exchanged["of"] == 9 * 96
    assert "summed over its 9 LayerNorms of 864 channels per stream (depth seed 0: RGB " in text
    assert all("exchanged_channels" not in r for r in runs if r["variant"] != "fft")
    assert any(line.startswith("| FFT-early (one stream, not in paper) |") for line in text.splitlines())

    capsys.readouterr()
    doc.write_text("# Title\n\n" + text + "\n## Discussion\n\nkept\n")
    assert ablation.main([*TINY, "--out", str(out), "--doc", str(doc)]) == 0  # all done: nothing trains
    assert "5 runs done before, 0 to go" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["runs"] == runs
    again = doc.read_text()
    assert again.startswith("# Title\n") and again.endswith("## Discussion\n\nkept\n")
    assert again.count("<!-- ablation begin -->") == 1 and "5 runs found finished" in again


def test_ablation_rejects_unknown_rows(capsys):
    assert ablation.main(["--variants", "gopt", "nope"]) == 2
    assert "unknown variants ['nope']" in capsys.readouterr().err


def test_each_seed_pretrains_its_own_foundation_on_the_same_world(tmp_path):
    """The seed varies the foundation's training, not the scenes: seeds 0 and 1 give different
    weights, seed 0 again gives the same bytes."""
    from dataclasses import replace

    from gopt_adapter.demo import DemoConfig

    demo = DemoConfig(train_length=16, val_length=4)
    config = ablation.AblationConfig(worlds=("depth",), seeds=(0, 1), variants=("gopt",),
                                     demo=replace(demo, foundation=replace(demo.foundation, epochs=1)))
    paths = [ablation.foundation_weights(tmp_path / name, "depth", seed)
             for name, seed in (("a", 0), ("b", 1), ("c", 0))]
    for path, seed in zip(paths, (0, 1, 0)):
        ablation.pretrain(config, "depth", seed, str(path))
    first, other, again = (path.read_bytes() for path in paths)
    assert first == again and first != other
