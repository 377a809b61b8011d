"""benchmarks.gpu_check --quick --device cpu: the CUDA check's code path, end to end, in CI.

Its end-to-end part is also the suite's one proof that a ``gopt train`` process killed with
SIGKILL mid-epoch resumes (``--resume``) to the uninterrupted run's adapter, bit for bit, and its
metrics. The resume's log, cut back to the checkpoint, and a finished run's resume are
``tests/test_engine.py``'s, in one process."""

import json

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check import COMPILED_THEN, DOC_KEY, INFER_VARIANTS, TRAIN_VARIANTS


def test_quick_cpu_run_measures_every_part_and_renders_the_docs_block(tmp_path):
    out = tmp_path / "out"
    # The default --quick budget (70 s) holds any run under 90 s by skipping what does not fit;
    # on an idle 2-core machine nothing needs skipping (about 40 s of CPU time in all). Here the
    # budget is wider so that a loaded CI machine still measures every part this test checks.
    assert gpu_check.main(["--out", str(out), "--quick", "--device", "cpu", "--budget-s", "150"]) == 0
    record = json.loads((out / "gpu_check.json").read_text())
    assert record["total_s"] < 150 + gpu_check.E2E_GRACE_S and "aborted" not in record
    assert record["setting"]["quick"] and record["setting"]["compile_backend"] == "eager"
    for name in TRAIN_VARIANTS:
        eager = record["training"][name]["eager"]
        assert eager["images_per_s"] == pytest.approx(2 / (eager["step_ms"] / 1e3))
    for name in INFER_VARIANTS:
        eager = record["inference"][name]["eager"]
        assert eager["b1"]["batch"] == 1 and eager["b1"]["ms"] > 0 and eager["bN"]["images_per_s"] > 0
    # GoPT's compiled ratio comes first and always fits
    assert record["inference"]["gopt"]["compiled"]["b1"]["ms"] > 0
    assert record["inference"]["lower_bound"]["compiled"]["b1"]["ms"] > 0
    assert record["training"]["gopt"]["compiled"]["images_per_s"] > 0
    for name, kind in COMPILED_THEN:  # the same code, measured on a GPU, named as skipped by --quick
        assert "compiled" not in record["training" if kind == "train" else "inference"].get(name, {})
        assert any(s.startswith(f"{name} compiled {kind}: --quick compiles only") for s in record["skipped"])
    assert record["swap"]["load_adapter_ms"] > 0 and record["swap"]["set_adapter_ms"] > 0

    e2e = record["e2e"]
    assert "error" not in e2e, e2e
    assert e2e["steps"] == 6 and e2e["checkpoint_step"] == 2 and e2e["killed_after_step"] == 3
    assert e2e["resumed"] and e2e["bitwise_equal"] and e2e["max_abs_diff"] == 0 and e2e["metrics_equal"]

    images = 795 // 64 * 64 * 60  # NYUDv2 recipe, drop_last
    hours = record["projection"]["hours"]["gopt eager"]
    assert hours == pytest.approx(images / record["training"]["gopt"]["eager"]["images_per_s"] / 3600)

    block = (out / "gpu_check.md").read_text()
    assert block == gpu_check.render(record)
    assert "| gopt |" in block and "bitwise equal to the uninterrupted run's" in block
    doc = tmp_path / "performance.md"
    doc.write_text("# Performance\n\nprose before\n\n## CUDA\n\nprose after\n")
    assert gpu_check.main(["--render", str(out / "gpu_check.json"), "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("# Performance\n\nprose before\n\n## CUDA\n\nprose after\n")
    assert f"<!-- {DOC_KEY} begin -->" in text and block.strip() in text and record["command"] in text
