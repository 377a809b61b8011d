"""The README's code runs verbatim."""

import re
from pathlib import Path


README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert namespace["logits"].shape == (1, 40, 480, 640)
    assert (tmp_path / "nyu_adapter" / "adapter_model.safetensors").exists()
    assert type(namespace["original"].blocks[0]).__name__ == "Block"


def own_data_section() -> str:
    text = README.read_text()
    start = text.index("## Train on your own data\n")
    return text[start:text.index("\n## ", start + 1)]


def test_readme_train_on_your_own_data_runs(tmp_path, monkeypatch, capsys):
    """The section's gopt commands, verbatim, on a tiny folder laid out as it shows, with random
    weights of the timm model it names written where it says; training runs 2 epochs (the
    section's own ``--set train.epochs=N``), not the folder defaults' 30."""
    import shlex

    import numpy as np
    import timm
    import torch
    from safetensors.torch import save_file

    from datasets_helpers import write_png
    from gopt_adapter import read_adapter_file
    from gopt_adapter.cli.commands import main

    (block,) = re.findall(r"```sh\n(.*?)```", own_data_section(), flags=re.S)
    commands = [shlex.split(line) for line in block.splitlines() if line.startswith("gopt ")]
    assert [c[1] for c in commands] == ["train", "predict"]
    train, predict = commands
    flag = lambda args, name: args[args.index(name) + 1]  # noqa: E731
    layout = re.search(r"```text\n(.*?)```", own_data_section(), flags=re.S).group(1)
    root = flag(train, "--root")
    assert f"{root}/classes.txt" in layout and f"{root}/train/label/" in layout
    monkeypatch.chdir(tmp_path)
    import datasets_helpers

    datasets_helpers.make_folder(tmp_path / root, {"train": 8, "val": 2}, h=32, w=48)
    torch.manual_seed(0)
    vit = timm.create_model(flag(train, "--backbone"), pretrained=False, num_classes=0)
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, flag(train, "--weights"))
    rgb_path, aux_path = [a for a in predict if a.endswith(".png")]
    rng = np.random.default_rng(1)
    write_png(tmp_path / rgb_path, rng.integers(0, 256, (40, 56, 3), dtype=np.uint8))
    write_png(tmp_path / aux_path, rng.integers(500, 9000, (40, 56), dtype=np.uint16))  # 16-bit depth, mm

    torch.set_num_threads(1)
    for command in (train + ["--set", "train.epochs=2"], predict):
        assert main(command[1:]) == 0, capsys.readouterr().err
    adapter = read_adapter_file(tmp_path / flag(train, "--out") / "adapter.safetensors")
    assert adapter.class_names == ("floor", "wall", "table") and adapter.backbone_name == flag(train, "--backbone")
    out = tmp_path / flag(predict, "-o")
    assert (out / f"{Path(rgb_path).stem}_label.png").is_file() and (out / f"{Path(rgb_path).stem}_panel.png").is_file()
