"""The synthetic ablation (benchmarks.ablation) end to end on a tiny budget, and its resume."""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pytest
import timm
import torch

from benchmarks import ablation, robustness, suite
from benchmarks.workers import worker_pool
from gopt_adapter.baselines import build_variant
from gopt_adapter.data import SyntheticRGBX
from gopt_adapter.cli.demo import DemoConfig
from gopt_adapter.parameters import count_parameters

TINY = ["--worlds", "depth", "--seeds", "0", "--variants", "gopt", "vpt_shallow", "gopt_soft", "fft", "fft_early",
        "--epochs", "1", "--train-length", "16", "--val-length", "4", "--workers", "1"]


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
    demo = DemoConfig(train_length=16, val_length=4)
    absolute = replace(ablation.SETUPS["absolute"], demo=replace(demo, foundation=replace(demo.foundation, epochs=1)))
    config = ablation.AblationConfig(worlds=("depth",), seeds=(0, 1), variants=("gopt",), setups={"absolute": absolute})
    paths = [ablation.foundation_weights(tmp_path / name, "depth", seed)
             for name, seed in (("a", 0), ("b", 1), ("c", 0))]
    for path, seed in zip(paths, (0, 1, 0)):
        ablation.pretrain(config, "depth", seed, str(path))
    first, other, again = (path.read_bytes() for path in paths)
    assert first == again and first != other


def test_world_flag_chooses_the_worlds_and_the_robustness_runs_stay_as_they_were(capsys):
    parser = ablation.build_parser("ablation", "", ablation.TABLE4, "runs/ablation")
    config = ablation.config_from_args(parser.parse_args([]))
    assert config.worlds == ("depth", "thermal") and config.setups == ablation.SETUPS
    absolute = config.setup("thermal")  # half the demo's scenes, the foundation's 144 steps kept
    assert absolute.demo == DemoConfig(train_length=192, val_length=128,
                                       foundation=replace(DemoConfig.foundation, epochs=12))
    assert absolute.gopt_hidden_dim is None
    robust = robustness.SETUPS["absolute"]  # the demo's own scenes: the records of docs/results.md's tables
    assert robust.demo == DemoConfig(train_length=384, val_length=128) and robust.frozen == absolute.frozen
    assert robustness.SETUPS["relative"] == ablation.SETUPS["relative"]
    assert (absolute.frozen.epochs, absolute.frozen.lr, absolute.full.lr) == (16, 3e-3, 5e-4)
    assert absolute.variant_options("gopt") == {} and config.setup("relative").variant_options("gopt") == {"hidden_dim": 8}
    both = ablation.config_from_args(parser.parse_args(["--world", "depth", "thermal", "relative", "--epochs", "2",
                                                        "--train-length", "8"]))
    assert both.worlds == ("depth", "thermal", "relative")
    for world in both.worlds:  # the overrides reach every family, the rest stays each family's own
        assert both.setup(world).frozen.epochs == both.setup(world).full.epochs == 2
        assert both.setup(world).demo.train_length == 8
        assert both.setup(world).demo.val_length == ablation.SETUPS[world if world == "relative" else "absolute"].demo.val_length
    assert ablation.config_from_args(parser.parse_args(["--worlds", "relative"])).worlds == ("relative",)
    assert ablation.main(["--world", "lidar"]) == 2
    assert "unknown worlds ['lidar']" in capsys.readouterr().err
    with pytest.raises(ValueError):
        ablation.AblationConfig(worlds=("relative",), setups={"absolute": ablation.SETUPS["absolute"]})
    with pytest.raises(ValueError):
        ablation.WorldSetup(DemoConfig(), ablation.SETUPS["absolute"].frozen, ablation.SETUPS["absolute"].full,
                            gopt_hidden_dim=0)


def budget(setup: ablation.WorldSetup, variant: str, num_classes: int) -> int:
    """Trainable parameters of ``variant`` on ``setup``'s backbone (shapes only, on the meta device)."""
    with torch.device("meta"):
        backbone = timm.create_model(setup.demo.backbone, pretrained=False, num_classes=0, **setup.demo.backbone_kwargs)
        return count_parameters(build_variant(variant, backbone, 1, num_classes, **setup.variant_options(variant))).trainable


def test_the_relative_setup_orders_the_budgets_as_the_paper():
    """256 tokens of 8x8 pixels, 8 blocks, about 100 scenes; GoPT-Shallow < VPT-Shallow < GoPT <
    VPT-Deep, the order of the paper's ViT-B/16 (0.28M < 0.41M < 0.94M < 2.58M on NYUDv2)."""
    setup = ablation.SETUPS["relative"]
    kwargs = setup.demo.backbone_kwargs
    assert (setup.demo.size // kwargs["patch_size"]) ** 2 >= 256 and kwargs["depth"] >= 8
    assert 90 <= setup.demo.train_length <= 110 and setup.demo.train_length % setup.frozen.batch_size == 0
    counts = [budget(setup, v, 20) for v in ("gopt_shallow", "vpt_shallow", "gopt", "vpt_deep")]
    assert counts == sorted(counts) and len(set(counts)) == 4
    assert budget(replace(setup, gopt_hidden_dim=None), "gopt", 20) > counts[-1]  # r = 32 would not be


def test_a_relative_run_records_its_fingerprint_and_is_trained_again_when_its_settings_change(tmp_path):
    """A tiny relative world trained in this process: GoPT at the family's width, the record
    reused while its settings hold, trained again (alone, or with its foundation) when they
    change or when it has no fingerprint; the setup paragraph prints the RGB-only bound."""
    relative = ablation.SETUPS["relative"].overridden(epochs=1, train_length=16, val_length=4)
    relative = replace(relative, demo=replace(relative.demo, size=32, foundation=replace(relative.demo.foundation, epochs=1)))
    config = ablation.AblationConfig(worlds=("relative",), seeds=(0,), variants=("gopt",), setups={"relative": relative},
                                     workers=1)
    out = tmp_path / "abl"
    records, todo, foundations = ablation.plan(config, out)
    assert records == [] and len(todo) == 1 and foundations == [("relative", 0, todo[0][3])]
    ablation.pretrain(config, *foundations[0])
    record = ablation.run_one(config, *todo[0])
    assert record["trainable_parameters"] == budget(relative, "gopt", 20)
    assert record["rgb_only_bound"] == pytest.approx(SyntheticRGBX("relative", length=1).rgb_only_miou_bound)
    assert "Best mIoU reachable from RGB alone, by construction: relative 17.7." in ablation.setup(config, [record], 60)
    assert ablation.plan(config, out) == ([record], [], [])

    longer = replace(config, setups={"relative": relative.overridden(epochs=2)})
    assert ablation.plan(longer, out)[1:] == (todo, [])  # the run again, on the same foundation
    more = replace(config, setups={"relative": relative.overridden(train_length=32)})
    assert ablation.plan(more, out)[1:] == (todo, foundations)  # other scenes: a new foundation too
    result = out / "relative" / "gopt_s0.json"
    result.write_text(json.dumps({k: v for k, v in record.items() if k != "fingerprint"}))  # made before fingerprints
    assert ablation.plan(config, out)[1:] == (todo, [])


def test_report_of_both_families():
    """Fake records of both families: one paper column per dataset, GoPT-Shallow's interval and
    the two-stream LayerNorms per backbone."""
    config = ablation.AblationConfig(worlds=("depth", "relative"), seeds=(0,), variants=("gopt", "gopt_shallow", "fft"))
    records = [{"world": world, "variant": variant, "seed": 0, "miou": 0.5, "miou_aux_classes": 0.4,
                "trainable_parameters": 1000, "rgb_only_bound": bound,
                **({"exchanged_channels": {"rgb": 4, "aux": 4, "of": channels, "layer_norms": norms}}
                   if variant == "fft" else {})}
               for world, bound, channels, norms in (("depth", 2 / 3, 864, 9), ("relative", 0.1771, 1088, 17))
               for variant in config.variants]
    text = ablation.report(config, records, 60.0)
    assert text.count("paper nyudv2 mIoU") == 1 and "| 54.1 |" in text
    assert "### Fig. 6 layout: interval between prompters (4 / 8-block backbone)" in text
    assert "| 4 / 8 | 1,000 / 1,000 |" in text
    assert "summed over its 9 LayerNorms of 864 channels per stream (depth seed 0" in text
    assert "summed over its 17 LayerNorms of 1,088 channels per stream (relative seed 0" in text
    assert "depth 66.7, relative 17.7." in text and "GoPT rows of width 8" in text


def test_one_worker_runs_the_jobs_in_this_process_and_hands_their_errors_back():
    """``--workers 1``: the jobs run in this process, no process is spawned; a job's exception
    reaches the caller through its future, as from a process pool."""
    with worker_pool(1) as pool:
        here, failed = pool.submit(os.getpid), pool.submit(int, "not a number")
    assert here.result() == os.getpid()
    with pytest.raises(ValueError):
        failed.result()
    with pytest.raises(ValueError):
        worker_pool(0)
