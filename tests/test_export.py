"""ONNX export: onnxruntime matches PyTorch on three families, dynamic sizes, the aux-missing mode, the CLI, errors."""

import os

import pytest
import timm
import torch

from gopt_adapter import apply_gopt, export_onnx, save_adapter
from gopt_adapter.cli.commands import main
from gopt_adapter.export import FP16_RELATIVE_TOLERANCE, PARITY_TOLERANCE, example_inputs, onnx_max_difference
from gopt_adapter.atomic_files import write_tensors
from model_helpers import make_backbone, perturb_adapter

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def trained(family: str, **options):
    segmenter = apply_gopt(make_backbone(family), aux_channels=2, num_classes=5, hidden_dim=8, head_channels=16,
                           **options)
    perturb_adapter(segmenter, std=0.1)
    assert all(p.up.weight.abs().sum() > 0 for p in segmenter.adapter.prompters)  # prompts reach the tokens
    return segmenter


def graph_inputs(path) -> list[tuple[str, list]]:
    """Each input of the ONNX graph at ``path``: its name and dims (a str where the axis is dynamic)."""
    return [(i.name, [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim])
            for i in onnx.load(str(path)).graph.input]


# Three families, each export a different graph: a plain ViT with dynamic sizes in fp32 is
# docs/api.md's own example (tests/test_api_doc.py runs it) and the CLI's (below).
def test_the_aux_missing_mode_is_exported_as_a_flag_input_at_dynamic_sizes_and_as_an_rgb_only_graph(tmp_path):
    """Eva02 (rope, padding to patch 14, two prompters) with ``aux_missing_input``: a third input;
    on a batch mixing samples with and without aux, at two sizes, the graph matches
    ``segmenter(rgb, aux, aux_missing=...)``, and the flags change the logits. A plain ViT with
    ``rgb_only``: ``rgb`` is the only input and the graph matches ``segmenter(rgb)``."""
    import onnxruntime

    segmenter = trained("eva02", interval=2, aux_dropout=0.2).train()
    with torch.no_grad():
        segmenter.adapter.missing_logit_bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0, 0.1]))
    flagged = export_onnx(segmenter, tmp_path / "flags.onnx", (28, 42), dynamic_size=True, aux_missing_input=True)
    assert segmenter.training and segmenter.adapter.training  # the mode is restored
    model = onnx.load(str(flagged))
    assert [o.name for o in model.graph.output] == ["logits"]
    (rgb_name, rgb_dims), aux_input, (flags_name, flags_dims) = graph_inputs(flagged)
    assert (rgb_name, aux_input[0], flags_name) == ("rgb", "aux", "aux_missing")
    assert rgb_dims[1] == 3 and all(isinstance(d, str) for d in (rgb_dims[0], *rgb_dims[2:], *flags_dims))
    for size, batch, mixed in (((28, 42), 3, [True, False, True]), ((43, 57), 2, [False, True])):
        rgb, aux = example_inputs(segmenter, size, batch=batch, seed=batch)
        assert onnx_max_difference(flagged, segmenter, rgb, aux, torch.tensor(mixed)) < PARITY_TOLERANCE
    session = onnxruntime.InferenceSession(str(flagged), providers=["CPUExecutionProvider"])
    feeds = {"rgb": rgb.numpy(), "aux": aux.numpy()}
    (present,) = session.run(["logits"], {**feeds, "aux_missing": torch.zeros(2, dtype=torch.bool).numpy()})
    (absent,) = session.run(["logits"], {**feeds, "aux_missing": torch.ones(2, dtype=torch.bool).numpy()})
    assert abs(present - absent).max() > 1e-2  # the flags reach the graph

    assert sorted(os.listdir(tmp_path)) == ["flags.onnx"]  # no temporary file left behind

    robust_vit = trained("vit", aux_dropout=0.2)  # a plain ViT: a cheaper graph, the same wrapper
    rgb_only = export_onnx(robust_vit, tmp_path / "rgb.onnx", (32, 48), rgb_only=True)
    assert [name for name, _ in graph_inputs(rgb_only)] == ["rgb"]
    assert onnx_max_difference(rgb_only, robust_vit, example_inputs(robust_vit, (32, 48), batch=2, seed=1)[0]) \
        < PARITY_TOLERANCE

    plain = trained("vit")
    for flag in ("aux_missing_input", "rgb_only"):
        with pytest.raises(ValueError, match=f"{flag} needs an adapter with an aux-missing mode"):
            export_onnx(plain, tmp_path / "no.onnx", (32, 48), **{flag: True})
    with pytest.raises(ValueError, match="give one of them"):
        export_onnx(segmenter, tmp_path / "no.onnx", (28, 42), aux_missing_input=True, rgb_only=True)
    assert not (tmp_path / "no.onnx").exists()


def test_dinov2_exports_an_fp16_graph_at_a_fixed_size_within_its_stated_tolerance(tmp_path):
    """DINOv2 with register tokens and soft assignment, ``dtype=torch.float16``, no dynamic size:
    fp16 inputs and logits, H and W fixed, within FP16_RELATIVE_TOLERANCE (0.5% of the largest
    logit) of the fp32 PyTorch model, which is left in fp32; bf16 is refused with its reason."""
    segmenter = trained("dinov2_reg", assignment="soft")
    before = {name: p.dtype for name, p in segmenter.named_parameters()}
    path = export_onnx(segmenter, tmp_path / "half.onnx", (28, 28), dtype=torch.float16)
    graph = onnx.load(str(path)).graph
    assert {i.type.tensor_type.elem_type for i in graph.input} == {onnx.TensorProto.FLOAT16}
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    (_, rgb_dims), (_, aux_dims) = graph_inputs(path)
    assert isinstance(rgb_dims[0], str) and rgb_dims[1:] == [3, 28, 28] and aux_dims[1:] == [2, 28, 28]
    difference = onnx_max_difference(path, segmenter, *example_inputs(segmenter, (28, 28), batch=3, seed=3),
                                     relative=True)
    assert difference < FP16_RELATIVE_TOLERANCE, difference
    assert {name: p.dtype for name, p in segmenter.named_parameters()} == before
    with pytest.raises(ValueError, match="bf16 is not exported: onnxruntime's CPU provider"):
        export_onnx(segmenter, tmp_path / "bf16.onnx", (28, 28), dtype=torch.bfloat16)
    assert not (tmp_path / "bf16.onnx").exists()


def test_export_refuses_bad_requests_before_tracing(tmp_path):
    segmenter = trained("vit")
    with pytest.raises(TypeError, match="export_onnx needs a segmenter"):
        export_onnx(segmenter.backbone, tmp_path / "m.onnx", (32, 32))
    for size in [(32,), (0, 32), (32.0, 32), "32x32"]:
        with pytest.raises(ValueError, match="two positive integers"):
            export_onnx(segmenter, tmp_path / "m.onnx", size)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        export_onnx(segmenter, tmp_path / "m.onnx", (30, 32))
    with pytest.raises(ValueError, match="opset"):
        export_onnx(segmenter, tmp_path / "m.onnx", (32, 32), opset=9)
    with pytest.raises(IsADirectoryError):
        export_onnx(segmenter, tmp_path, (32, 32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(segmenter, tmp_path / "missing" / "m.onnx", (32, 32))
    fixed = apply_gopt(make_backbone("beit"), aux_channels=1, num_classes=2)
    with pytest.raises(ValueError, match="fixed input size.*dynamic_img_size=True"):
        export_onnx(fixed, tmp_path / "m.onnx", (64, 64), dynamic_size=True)
    assert os.listdir(tmp_path) == []


TINY_VIT = '{"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}'


@pytest.fixture
def saved(tmp_path):
    """An adapter file and the backbone weights it was trained on, as gopt predict takes them."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                            embed_dim=32, depth=2, num_heads=2, img_size=64)
    write_tensors(tmp_path / "weights.safetensors", vit.state_dict())
    segmenter = apply_gopt(vit, aux_channels=1, num_classes=4, hidden_dim=8, head_channels=16)
    perturb_adapter(segmenter)
    save_adapter(segmenter, tmp_path / "adapter.safetensors")
    return ["--adapter", str(tmp_path / "adapter.safetensors"), "--weights", str(tmp_path / "weights.safetensors"),
            "--backbone", "vit_base_patch16_224", "--backbone-kwargs", TINY_VIT]


def test_cli_exports_checks_parity_and_prints_the_difference(tmp_path, saved, capsys):
    import onnxruntime

    assert main(["export", *saved, "--size", "32", "48", "-o", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "max |difference|" in out and "at 32x48" in out
    session = onnxruntime.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"rgb": torch.randn(3, 3, 32, 48).numpy(),
                                         "aux": torch.randn(3, 1, 32, 48).numpy()})
    assert logits.shape == (3, 4, 32, 48)
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


@pytest.mark.parametrize("flag", ["--aux-missing-input", "--rgb-only"])
def test_cli_refuses_the_missing_mode_flags_for_an_adapter_without_it_in_one_line(tmp_path, saved, capsys, flag):
    assert main(["export", *saved, "--size", "32", "48", flag, "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"error: {flag} needs an adapter with an aux-missing mode")
    assert not (tmp_path / "m.onnx").exists()


def test_cli_refuses_bf16_in_one_line_with_the_reason_before_reading_a_file(tmp_path, saved, capsys):
    absent = ["--adapter", str(tmp_path / "absent.safetensors"), *saved[2:]]
    for command in (saved, absent):  # the refusal comes first, whatever the files
        assert main(["export", *command, "--size", "32", "48", "--dtype", "bf16", "-o", str(tmp_path / "m.onnx")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "onnxruntime's CPU provider" in err and "--dtype fp16" in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_writes_nothing_when_parity_fails(tmp_path, saved, capsys, monkeypatch):
    import gopt_adapter.export as export

    monkeypatch.setattr(export, "export_onnx", lambda segmenter, path, *a, **k: open(path, "wb").write(b"x"))
    monkeypatch.setattr(export, "onnx_max_difference", lambda *a, **k: 0.5)
    (tmp_path / "m.onnx").write_bytes(b"old")
    assert main(["export", *saved, "--size", "32", "48", "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ONNX Runtime's logits differ") and "nothing was written" in err
    assert (tmp_path / "m.onnx").read_bytes() == b"old"
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".")]


@pytest.mark.parametrize("weights, extra, message", [
    (True, ["--size", "30", "48", "--backbone-kwargs", TINY_VIT], "not divisible by the patch size"),
    (True, ["--size", "0", "48", "--backbone-kwargs", TINY_VIT], "not a positive image size"),
    (False, ["--size", "64", "64", "--backbone-kwargs", '{"embed_dim": 48, "depth": 2, "num_heads": 2}'],
     "adapter made for another backbone"),
    (True, ["--size", "64", "64", "--backbone", "beit_base_patch16_224", "--backbone-kwargs", '{"img_size": 64}'],
     "cannot build backbone 'beit_base_patch16_224'"),  # ViT weights do not fit a Beit
])
def test_cli_errors_are_one_line(tmp_path, saved, capsys, weights, extra, message):
    argv = saved[:4] if weights else saved[:2]
    if "--backbone" not in extra:
        argv = argv + ["--backbone", "vit_base_patch16_224"]
    assert main(["export", *argv, *extra, "-o", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "m.onnx").exists()


def test_cli_errors_for_paths_and_a_missing_backbone_name(tmp_path, saved, capsys):
    from safetensors.torch import load_file, safe_open

    import gopt_adapter.adapter_file as adapter_io

    with safe_open(saved[1], "pt") as handle:  # a file from before the timm name was recorded
        metadata = {k: v for k, v in handle.metadata().items() if k != "timm_model"}
    (tmp_path / "old.safetensors").write_bytes(adapter_io.seal(load_file(saved[1]), metadata))
    cases = [
        (["--adapter", str(tmp_path / "old.safetensors"), "--size", "32", "32", "-o", str(tmp_path / "m.onnx")],
         "records no timm model name"),
        (saved[:2] + ["--size", "32", "32", "-o", str(tmp_path / "m.onnx")],  # kwargs not recorded: default ViT-B
         "adapter made for another backbone"),
        (saved + ["--size", "32", "32", "-o", str(tmp_path)], "is a folder"),
        (saved + ["--size", "32", "32", "-o", str(tmp_path / "no" / "m.onnx")], "does not exist"),
        (["export", "--adapter", str(tmp_path / "none.safetensors"), "--size", "32", "32", "-o", "m.onnx"],
         "none.safetensors"),
    ]
    for argv, message in cases:
        argv = argv if argv[0] == "export" else ["export", *argv]
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err


def test_the_two_stream_fft_exports_with_its_exchange(tmp_path):
    """The paper's FFT (two stacked streams, exchange masks ranked without a sort) runs in ONNX
    Runtime as in PyTorch, with gains spread so that the exchange picks real channels."""
    from gopt_adapter.baselines import build_variant

    torch.manual_seed(0)
    segmenter = build_variant("fft", make_backbone("vit", depth=2), 1, 3).eval()
    with torch.no_grad():
        for norm in segmenter.exchange_norms():
            norm.weight.uniform_(0.5, 1.5)
            norm.aux_weight.uniform_(0.5, 1.5)
    assert any(mask.any() for norm in segmenter.exchange_norms() for mask in norm.exchange_masks())
    path = export_onnx(segmenter, tmp_path / "fft.onnx", (32, 48))
    assert onnx_max_difference(path, segmenter, *example_inputs(segmenter, (32, 48), batch=2, seed=3)) \
        < PARITY_TOLERANCE
