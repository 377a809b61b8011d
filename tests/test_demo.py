"""The demo pipeline end to end, shrunk: foundation -> frozen + GoPT -> save -> reload."""

from dataclasses import replace

from gopt_adapter.cli.commands import main
from gopt_adapter.cli.demo import DemoConfig, run_demo


def test_small_demo_runs_and_reloads_identically(tmp_path, capsys):
    config = DemoConfig()
    config = replace(config, size=32, train_length=32, val_length=8, out=str(tmp_path),
                     backbone_kwargs={**config.backbone_kwargs, "img_size": 32, "depth": 2},
                     foundation=replace(config.foundation, epochs=1, warmup_steps=0),
                     gopt=replace(config.gopt, epochs=1, warmup_steps=0))
    result = run_demo(config, progress=True)  # stderr is no terminal here: plain lines, no bars
    assert result["reloaded_identical"]
    assert result["gopt_trainable"] < 1_000_000
    assert (tmp_path / "gopt_adapter.safetensors").stat().st_size == result["adapter_bytes"]
    captured = capsys.readouterr()
    table = captured.out
    assert "| GoPT (frozen foundation + adapter) |" in table and "predicts identically: yes" in table
    assert "\r" not in captured.err  # as in `gopt demo > log 2>&1`
    lines = [line for line in captured.err.splitlines() if line.startswith("epoch 1/1 step 2/2 loss ")]
    assert len(lines) == 2 and all(" img/s ETA " in line for line in lines), captured.err  # foundation, GoPT
    assert captured.err.count("eval after epoch 1/1: ") == 2


def test_cli_rejects_unknown_commands(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["fly"])
    assert "invalid choice" in capsys.readouterr().err
