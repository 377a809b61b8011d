"""docs/api.md: every ```python block runs, in order, in one namespace, in a temporary folder."""

import re
from pathlib import Path

API = Path(__file__).resolve().parents[1] / "docs" / "api.md"


def test_api_doc_python_blocks_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", API.read_text(), flags=re.S)
    assert len(blocks) >= 8
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "api_doc"}
    for index, block in enumerate(blocks):
        exec(compile(block, f"{API}:block{index}", "exec"), namespace)
    assert namespace["logits"].shape == (2, 8, 64, 96)
    assert (tmp_path / "depth_adapter" / "adapter_model.safetensors").is_file()
    assert type(namespace["original"].blocks[0]).__name__ == "Block"
    assert namespace["label"].shape == (60, 90)
    assert (tmp_path / "predictions" / "room_panel.png").is_file()
    assert list(namespace["segmenter"].adapters) == ["default", "depth_copy"]
