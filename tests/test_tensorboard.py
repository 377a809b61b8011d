"""``train.logger=tensorboard``: event files read back with TensorBoard's own reader; a clear
one-line refusal when the package is missing."""

import json

import pytest

from gopt_adapter.cli.commands import main

SMALL = ["train", "--dataset", "synthetic", "--device", "cpu", "--set", "train.progress=false",
         "--set", "train.log_every=1", "--set", "dataset_options.length=16", "--set", "val_options.length=4",
         "--set", "train.batch_size=8", "--set", "train.epochs=2"]
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def test_a_run_writes_its_steps_evaluations_and_settings_to_tensorboard(tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    assert main([*SMALL, "--set", "train.logger=tensorboard", "--out", str(out)]) == 0, capsys.readouterr().err
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]  # the JSONL log stays
    train = [r for r in log if r["event"] == "train"]
    for name in ("loss", "lr", "images_per_s", "nonfinite_steps"):
        points = events.Scalars(f"train/{name}")
        assert [p.step for p in points] == [r["step"] for r in train]
        assert [p.value for p in points] == pytest.approx([r[name] for r in train], rel=1e-6)
    final = json.loads((out / "results.json").read_text())
    assert events.Scalars("eval/miou")[-1].value == pytest.approx(final["metrics"]["miou"], rel=1e-6)
    classes = final["class_names"]
    iou = final["metrics"]["iou"]
    shown = [name for name, value in zip(classes, iou) if value is not None]
    assert shown and {f"eval/iou/{name}" for name in shown} <= tags
    (settings,) = events.Tensors("settings/text_summary")  # add_text: the run's settings, once
    text = settings.tensor_proto.string_val[0].decode()
    assert '"logger": "tensorboard"' in text and '"epochs": 2' in text


def test_the_logger_fails_up_front_in_one_line_without_the_package(tmp_path, capsys, monkeypatch):
    import gopt_adapter.train.tensorboard as board

    real = board.importlib.util.find_spec
    monkeypatch.setattr(board.importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard"
                        else real(name, *a))
    assert main([*SMALL, "--set", "train.logger=tensorboard", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'gopt-adapter[tb]'" in err
    assert not (tmp_path / "run").exists()
