"""From a built wheel, with no clone: gopt train / eval / predict / inspect in an empty folder.

The wheel is built from a copy of the package sources (so the checkout gets no build/ or
egg-info), installed into a fresh virtual environment whose third-party packages (torch,
timm, ...) come from this test environment through a ``.pth`` file naming its site-packages,
and run from a temporary folder outside the checkout.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import save_file

from datasets_helpers import make_folder

ROOT = Path(__file__).resolve().parents[1]
KWARGS = {"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32}


# Runs gopt commands (JSON: name -> argv) with the installed package's cli.main and prints one
# JSON line: where the package and its configs were imported from, and each command's exit status
# and standard output.
DRIVER = """
import contextlib, io, json, sys
import gopt_adapter, gopt_adapter.cli as cli, gopt_adapter.train.run_config as run_config
done = {"imported": [gopt_adapter.__file__, str(run_config.config_path("folder"))]}
for name, argv in json.loads(sys.argv[1]).items():
    with contextlib.redirect_stdout(io.StringIO()) as out:
        status = cli.main(argv)
    done[name] = [status, out.getvalue()]
print(json.dumps(done))
"""


def run(command, cwd, env, timeout=300):
    done = subprocess.run([str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return done


def test_wheel_install_trains_evaluates_predicts_and_inspects_without_a_clone(tmp_path):
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gopt_adapter", source / "gopt_adapter", ignore=shutil.ignore_patterns("__pycache__"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OMP_NUM_THREADS"] = "1"
    dist = tmp_path / "dist"
    # with the installed setuptools when there is one (offline, seconds); else pip fetches it
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *offline, "-q", "-w", dist, source], tmp_path, env)
    (wheel,) = dist.glob("gopt_adapter-*.whl")

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path,
                    env).stdout.strip())
    (site / "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, timm, ... from here
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        tmp_path, env)

    work = tmp_path / "work"  # holds no clone: data, weights and outputs only
    make_folder(work / "data", {"train": 4, "val": 2}, classes=("sky", "road", "car"))
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, **KWARGS)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(work / "vit.safetensors"))

    gopt = venv / "bin" / "gopt"
    run([gopt, "train", "--dataset", "folder", "--root", "data", "--weights", "vit.safetensors",
         "--set", f"backbone_kwargs={json.dumps(KWARGS)}", "--set", "train.epochs=1", "--set", "train.batch_size=4",
         "--device", "cpu", "--out", "run"], work, env)
    record = json.loads((work / "run" / "results.json").read_text())
    assert record["backbone_init"] == "weights" and record["class_names"] == ["sky", "road", "car"]
    # eval, predict and inspect through the package's cli.main, in one process of the venv's Python
    # (the console script is the train above): it also says where the package and its configs came from
    commands = {
        "eval": ["eval", "--dataset", "folder", "--root", "data", "--adapter", "run/adapter.safetensors",
                 "--weights", "vit.safetensors", "--device", "cpu"],
        "predict": ["predict", "--adapter", "run/adapter.safetensors", "--weights", "vit.safetensors",
                    "--pairs-dir", "data/val", "-o", "pred"],
        "inspect": ["inspect", "run/adapter.safetensors"],
    }
    driver = tmp_path / "drive.py"
    driver.write_text(DRIVER)
    done = json.loads(run([python, driver, json.dumps(commands)], work, env).stdout.strip().splitlines()[-1])
    for path in map(Path, done["imported"]):  # from the wheel in the venv, not from the checkout
        assert path.is_file() and path.is_relative_to(venv) and not path.is_relative_to(ROOT), done["imported"]
    assert all(done[name][0] == 0 for name in commands), done
    evaluated = json.loads(done["eval"][1].strip().splitlines()[-1])
    assert evaluated["miou"] == pytest.approx(record["metrics"]["miou"])
    assert sorted(p.name for p in (work / "pred").iterdir()) == [
        "val_000_label.png", "val_000_panel.png", "val_001_label.png", "val_001_panel.png"]
    shown = done["inspect"][1]
    assert "3: sky, road, car" in shown and "vit_base_patch16_224" in shown
