"""``gopt bench``: parameters, GFLOPs, latency and memory of an adapter, and its ratios to the probe."""

import json

import pytest
import timm
import torch

from gopt_adapter import apply_gopt, count_parameters, save_adapter
from gopt_adapter.atomic_files import write_tensors
from gopt_adapter.baselines import build_variant
from gopt_adapter.cli.commands import main

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}
pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True, **TINY)


def bench(capsys, *args):
    assert main(["bench", "--size", "32", "48", "--batch", "2", "--repeats", "2", "--warmup", "1", "--device", "cpu",
                 "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_bench_of_an_adapter_file_against_the_probe(tmp_path, capsys):
    vit = tiny_vit()
    write_tensors(tmp_path / "vit.safetensors", vit.state_dict())
    segmenter = apply_gopt(vit, aux_channels=2, num_classes=5, hidden_dim=8, head_channels=16)
    save_adapter(segmenter, tmp_path / "a.safetensors")
    record = bench(capsys, "--adapter", str(tmp_path / "a.safetensors"), "--weights", str(tmp_path / "vit.safetensors"),
                   "--backbone", "vit_base_patch16_224", "--backbone-kwargs", json.dumps(TINY), "--vs", "probe")
    model, probe = record["model"], record["probe"]
    assert (model["trainable_parameters"], model["total_parameters"]) == tuple(count_parameters(segmenter))
    reference = count_parameters(build_variant("probe", tiny_vit(), 2, 5, head_channels=16))  # the adapter's head
    assert (probe["trainable_parameters"], probe["total_parameters"]) == tuple(reference)
    assert model["gflops_per_image"] > probe["gflops_per_image"] > 0  # the prompters add work
    for m in (model, probe):
        assert m["latency_ms"] > 0 and m["images_per_s"] == pytest.approx(2 / (m["latency_ms"] / 1e3))
        assert m["peak_memory_mb"] > 0 and m["peak_memory_kind"] == "process peak RSS"
    ratio = record["ratio_vs_probe"]
    assert ratio["trainable_parameters"] == pytest.approx(model["trainable_parameters"] / probe["trainable_parameters"])
    assert ratio["gflops_per_image"] == pytest.approx(model["gflops_per_image"] / probe["gflops_per_image"])
    assert "peak_memory_mb" not in ratio  # a process's peak RSS is not the model's
    assert record["size"] == [32, 48] and record["batch"] == 2


def test_bench_of_a_fresh_adapter_on_a_named_backbone_and_its_text(capsys):
    args = ["--backbone", "vit_base_patch16_224", "--random-init", "--backbone-kwargs", json.dumps(TINY),
            "--aux-channels", "1", "--num-classes", "3"]
    record = bench(capsys, *args)
    expected = apply_gopt(tiny_vit(), aux_channels=1, num_classes=3)
    assert record["model"]["trainable_parameters"] == count_parameters(expected).trainable
    assert main(["bench", *args, "--size", "32", "32", "--repeats", "1", "--warmup", "0", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert "GFLOPs/img" in text and "model" in text and "peak memory: process peak RSS" in text


@pytest.mark.parametrize("args, message", [
    (["--backbone", "vit_base_patch16_224"], "give --adapter FILE --weights W, or --backbone NAME with --random-init"),
    (["--backbone", "vit_base_patch16_224", "--random-init", "--batch", "0"], "--batch must be positive"),
    (["--adapter", "absent.safetensors"], "no such adapter file"),
])
def test_bench_refuses_bad_requests_in_one_line(capsys, args, message):
    assert main(["bench", "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err


def test_the_performance_table_measures_inference_as_gopt_bench_does(capsys):
    """docs/performance.md's CPU table (``benchmarks.perf``) counts FLOPs and parameters as the
    wheel's ``gopt bench`` does, and takes its lower bound from ``--vs probe``."""
    from benchmarks import perf

    perf.main(["--model", "vit_tiny_patch16_224", "--size", "32", "32", "--num-classes", "40", "--repeats", "1",
               "--swap-repeats", "2", "--variants", "gopt", "fft_early"])
    rows = {cells[0]: cells for line in capsys.readouterr().out.splitlines() if line.startswith("| ")
            for cells in [[cell.strip() for cell in line.strip("|").split("|")]]}
    record = bench(capsys, "--backbone", "vit_tiny_patch16_224", "--random-init", "--size", "32", "32", "--batch", "1",
                   "--vs", "probe")
    gopt, probe = rows["gopt"], next(cells for name, cells in rows.items() if name.startswith("lower bound"))
    assert gopt[1] == f"{record['model']['trainable_parameters']:,}"
    assert gopt[3] == f"{record['model']['gflops_per_image']:.3g}"
    assert probe[3] == f"{record['probe']['gflops_per_image']:.3g}"
    assert float(rows["fft_early"][5]) == 1.0 and float(gopt[4]) > 0  # ratios: FFT to itself, GoPT to the probe
