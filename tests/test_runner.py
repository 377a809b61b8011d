"""The benchmark runner end to end on the CPU: bad input, a short run, crash + resume, DDP."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks import run as runner
from gopt_adapter import read_adapter_file

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--device", "cpu", "--set", "train.progress=false", "--set", "train.log_every=1",
         "--set", "dataset_options.length=48", "--set", "val_options.length=8", "--set", "train.batch_size=8"]


def cli(*args, env=None, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "benchmarks.run", *args], cwd=ROOT, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "kitti"], "unknown dataset 'kitti'"),
        (["--dataset", "synthetic", "--variant", "gopt_xl"], "unknown variant 'gopt_xl'"),
        (["--dataset", "nyudv2"], "--root is required"),
        (["--dataset", "mfnet", "--root", "/nonexistent/MFNet"], "does not exist"),
        (["--dataset", "synthetic", "--weights", "/nonexistent/w.pth"], "weights file /nonexistent/w.pth not found"),
        (["--dataset", "synthetic", "--set", "train.epochs=0"], "epochs must be a positive integer"),
        (["--dataset", "synthetic", "--set", "trian.epochs=1"], "unknown settings ['trian']"),
    ],
)
def test_bad_input_fails_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert runner.main([*args, "--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_weights_that_do_not_fit_the_backbone(tmp_path, capsys):
    weights = tmp_path / "other.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 7)}, str(weights))
    assert runner.main([*SMALL, "--weights", str(weights), "--out", str(tmp_path / "run")]) == 2
    assert "do not fit backbone" in capsys.readouterr().err


def test_short_run_writes_results_and_adapter(tmp_path):
    out = tmp_path / "run"
    assert runner.main([*SMALL, "--variant", "gopt_shallow", "--set", "train.epochs=1", "--out", str(out)]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["variant"] == "gopt_shallow" and record["world_size"] == 1
    assert 0 <= record["metrics"]["miou"] <= 1 and record["train_images_per_s"] > 0
    assert record["trainable_parameters"] == sum(t.numel() for n, t in read_adapter_file(out / "adapter.safetensors")
                                                 .tensors.items() if "running" not in n and "num_batches" not in n)


def wait_for(predicate, process, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if process.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def train_records(log: Path):
    if not log.exists():
        return []
    return [r for r in map(json.loads, log.read_text().splitlines()) if r.get("event") == "train"]


def test_sigkill_mid_epoch_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    args = [*SMALL, "--set", "train.epochs=3", "--set", "dataset_options.length=96"]
    straight = cli(*args, "--out", str(tmp_path / "straight"))
    crashed_dir = tmp_path / "crashed"
    crashed = cli(*args, "--out", str(crashed_dir))
    log = crashed_dir / "log.jsonl"
    reached = wait_for(lambda: any(r["epoch"] == 2 for r in train_records(log)), crashed)
    crashed.send_signal(signal.SIGKILL)
    crashed.wait()
    assert reached, "the run ended before epoch 2 started: make the epochs longer"
    assert crashed.returncode == -signal.SIGKILL
    assert not (crashed_dir / "adapter.safetensors").exists()
    resumed = cli(*args, "--out", str(crashed_dir), "--resume")
    for process in (straight, resumed):
        _, err = process.communicate(timeout=600)
        assert process.returncode == 0, err[-2000:]
    a = load_file(str(tmp_path / "straight" / "adapter.safetensors"))
    b = load_file(str(crashed_dir / "adapter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(r.get("event") == "resume" and r["epoch"] == 1
               for r in map(json.loads, log.read_text().splitlines()))


def test_ddp_with_two_gloo_processes(tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "benchmarks.run", *SMALL, "--set", "train.epochs=1", "--out", str(out)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "results.json").read_text())
    assert record["world_size"] == 2
    steps = train_records(out / "log.jsonl")
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))  # one writer, no duplicates
    # metrics summed over both ranks equal a single-process evaluation of the same adapter
    from gopt_adapter import load_adapter
    from gopt_adapter.baselines import build_variant
    from gopt_adapter.engine import evaluate, seed_everything

    config = runner.load_run_config(runner.parse_args([*SMALL, "--out", str(out)]))
    seed_everything(config.train.seed)  # as run() does: the same random-init backbone
    _, val_set = runner.build_datasets(config)

    model = build_variant("gopt", runner.build_backbone(config), val_set.aux_channels, len(val_set.class_names))
    load_adapter(model, out / "adapter.safetensors")  # the digest proves it is the same backbone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank ran: the same float reduction order
    try:
        single = evaluate(model, val_set, len(val_set.class_names))
    finally:
        torch.set_num_threads(threads)
    assert single["miou"] == pytest.approx(record["metrics"]["miou"], abs=1e-12)


def test_suite_puts_our_runs_beside_the_papers_numbers(tmp_path):
    from benchmarks import suite

    for seed, miou in ((0, 0.50), (1, 0.52)):
        run_dir = tmp_path / f"nyu_gopt_{seed}"
        run_dir.mkdir()
        record = {"config": {"dataset": "nyudv2", "variant": "gopt"}, "trainable_parameters": 937224,
                  "metrics": {"pixel_acc": 0.8, "mean_acc": 0.6, "miou": miou}}
        (run_dir / "results.json").write_text(json.dumps(record))
    text = suite.render(suite.collect(tmp_path))
    table4 = text[text.index("Table 4"):]
    gopt_row = next(line for line in table4.splitlines() if line.startswith("| GoPT |"))
    assert "| 0.94M | 80.0±0.0 (79.8, +0.2) | 60.0±0.0 (67.5, -7.5) | 51.0±1.4 (54.1, -3.1) | - (77.1) |" in gopt_row


TINY_BACKBONE = ["--backbone", "vit_base_patch16_224", "--set",
                 'backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32, '
                 '"dynamic_img_pad": true}',
                 "--set", "transforms.crop_size=[16, 24]", "--set", "train.epochs=1", "--set", "train.batch_size=2",
                 "--set", "train.progress=false", "--device", "cpu"]


def make_layout(dataset, root):
    import datasets_helpers as helpers

    splits = {"train": ["a", "b", "c", "d"], "test": ["e", "f"]}
    if dataset in ("nyudv2", "sunrgbd"):
        helpers.make_nyudv2(root, splits, h=20, w=28, **({} if dataset == "nyudv2" else
                                                        {"label_folder": "labels", "num_classes": 37}))
    elif dataset == "mfnet":
        helpers.make_mfnet(root, {**splits, "val": ["g"]}, h=20, w=28)
    elif dataset == "pst900":
        helpers.make_pst900(root, splits, h=20, w=28)
    else:
        from gopt_adapter.datasets import tile_whu_opt_sar

        helpers.make_whu_scenes(root / "scenes", [f"s{i}" for i in range(5)], h=40, w=56)
        tile_whu_opt_sar(root / "scenes", root / "tiles", tile_size=16, progress=False)
        return root / "tiles"
    return root


@pytest.mark.parametrize("dataset", ["nyudv2", "sunrgbd", "mfnet", "pst900", "whu_opt_sar"])
def test_runner_on_tiny_copies_of_each_layout(dataset, tmp_path):
    root = make_layout(dataset, tmp_path / "data")
    out = tmp_path / "run"
    assert runner.main(["--dataset", dataset, "--root", str(root), "--variant", "gopt", "--out", str(out),
                        *TINY_BACKBONE]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["dataset"] == dataset and 0 <= record["metrics"]["miou"] <= 1
    assert (out / "adapter.safetensors").exists()
