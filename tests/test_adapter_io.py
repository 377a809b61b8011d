"""Adapter files: exact round trips, compact dtypes, the paper's size budget, and all-or-nothing loading.

Every failure case must raise :class:`AdapterError` with a message naming what is wrong and
leave the segmenter exactly as it was (every state tensor bitwise, the active adapter and the
set of adapters). The frozen backbone is never written by any save or load path.
"""

from __future__ import annotations

import json
import random
import struct
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import gopt_adapter.adapter_io as adapter_io
from conftest import assert_bitwise_equal, family_inputs, make_backbone, perturb_adapter, snapshot
from gopt_adapter import (
    AdapterError,
    GoptConfig,
    GoptSegmenter,
    apply_gopt,
    count_parameters,
    load_adapter,
    read_adapter_file,
    save_adapter,
)

# Two configs that differ in every structural choice: aux channels, classes, interval,
# assignment, ACP, head type.
CONFIGS = {
    "default": dict(aux_channels=1, num_classes=5),
    "soft_noacp_linear": dict(aux_channels=3, num_classes=7, interval=2, assignment="soft", use_acp=False,
                              head="linear"),
}
def fast(max_examples: int) -> settings:
    return settings(max_examples=max_examples, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


# ---------------------------------------------------------------------------- helpers
def build(options: dict, seed: int = 0, depth: int = 2, family: str = "vit"):
    """A fresh segmenter with an untouched (freshly initialised) adapter."""
    return apply_gopt(make_backbone(family, depth, seed), **options)


def trained(options: dict, seed: int = 0, perturb_seed: int = 0):
    """A segmenter whose adapter looks trained: weights and BN buffers moved, BN batches counted."""
    segmenter = build(options, seed)
    perturb_adapter(segmenter, seed=perturb_seed)
    rgb, aux = family_inputs("vit", batch=2, aux_channels=segmenter.config.aux_channels)
    segmenter.train()
    with torch.no_grad():  # one real train-mode step: running stats and num_batches_tracked move
        segmenter(rgb, aux)
    segmenter.eval()
    return segmenter


def adapter_state(segmenter, name: str | None = None) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in segmenter.get_adapter(name).state_dict().items()}


def assert_states_bitwise_equal(expected: dict[str, torch.Tensor], actual: dict[str, torch.Tensor]) -> None:
    assert list(expected) == list(actual)
    assert_bitwise_equal(list(expected.values()), list(actual.values()))


def outputs(segmenter) -> torch.Tensor:
    segmenter.eval()
    rgb, aux = family_inputs("vit", batch=2, aux_channels=segmenter.config.aux_channels)
    with torch.no_grad():
        return segmenter(rgb, aux)


class Untouched:
    """Context manager: the segmenter's every state tensor, active adapter and adapter names are unchanged."""

    def __init__(self, segmenter) -> None:
        self.segmenter = segmenter

    def __enter__(self):
        self.before = snapshot(self.segmenter)
        self.active = self.segmenter.active_adapter
        self.names = list(self.segmenter.adapters)
        return self

    def __exit__(self, *exc) -> bool:
        assert_bitwise_equal(self.before, snapshot(self.segmenter))
        assert self.segmenter.active_adapter == self.active
        assert list(self.segmenter.adapters) == self.names
        return False


def assert_rejected(segmenter, path, match: str | None, **kwargs) -> AdapterError:
    """load_adapter(path) raises AdapterError matching ``match`` and changes nothing; so does add_adapter."""
    with Untouched(segmenter):
        with pytest.raises(AdapterError, match=match) as info:
            load_adapter(segmenter, path, **kwargs)
        with pytest.raises(AdapterError, match=match):
            segmenter.add_adapter("rejected", path, **kwargs)
    return info.value


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Directory of reference files saved once per module from trained segmenters."""
    directory = tmp_path_factory.mktemp("adapter_files")
    source = trained(CONFIGS["default"])
    save_adapter(source, directory / "default.safetensors")
    save_adapter(build(CONFIGS["default"], seed=1), directory / "other_weights.safetensors")
    save_adapter(build(CONFIGS["default"], depth=3), directory / "depth3.safetensors")
    save_adapter(build(CONFIGS["default"], family="deit_distilled"), directory / "deit_distilled.safetensors")
    save_adapter(build({**CONFIGS["default"], "num_classes": 6}), directory / "six_classes.safetensors")
    return directory


def target():
    """A segmenter with two adapters (active 'default' perturbed, plus 'other') that files are loaded into."""
    segmenter = build(CONFIGS["default"])
    perturb_adapter(segmenter, seed=7)
    segmenter.add_adapter("other", GoptConfig(aux_channels=3, num_classes=4, head="linear"))
    return segmenter


# ------------------------------------------------------------------ exact round trips
@pytest.mark.parametrize("name", list(CONFIGS))
def test_round_trip_is_bitwise_exact(tmp_path, name):
    """save_adapter -> load_adapter reproduces every adapter tensor bitwise (BN running stats and
    num_batches_tracked included) and the eval-mode outputs exactly; add_adapter(path) does too."""
    source = trained(CONFIGS[name])
    expected = adapter_state(source)
    assert any(k.endswith("num_batches_tracked") and v.item() > 0 for k, v in expected.items())
    path = save_adapter(source, tmp_path / "adapter.safetensors")

    loaded = build(CONFIGS[name])
    assert not torch.equal(outputs(loaded), outputs(source))  # the load below has something to do
    load_adapter(loaded, path)
    assert_states_bitwise_equal(expected, adapter_state(loaded))
    assert torch.equal(outputs(loaded), outputs(source))

    added = build(CONFIGS[name])
    added.add_adapter("task", path)
    added.set_adapter("task")
    assert_states_bitwise_equal(expected, adapter_state(added))
    assert torch.equal(outputs(added), outputs(source))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_files_are_half_size_and_exact_casts(tmp_path, dtype):
    """dtype=bf16/fp16 roughly halves the file (< 0.55 of fp32) and stores exactly fp32.to(dtype);
    loading into the fp32 adapter gives those cast values back (integer buffers untouched)."""
    source = trained(CONFIGS["default"])
    expected = adapter_state(source)
    full = save_adapter(source, tmp_path / "fp32.safetensors")
    half = save_adapter(source, tmp_path / "half.safetensors", dtype=dtype)
    assert half.stat().st_size / full.stat().st_size < 0.55

    stored = read_adapter_file(half).tensors
    assert set(stored) == set(expected)
    for name, value in expected.items():
        cast = value.to(dtype) if value.is_floating_point() else value
        assert stored[name].dtype == cast.dtype, name
        assert_bitwise_equal([cast], [stored[name]])

    loaded = build(CONFIGS["default"])
    load_adapter(loaded, half)
    for name, value in adapter_state(loaded).items():
        want = expected[name].to(dtype).to(expected[name].dtype) if expected[name].is_floating_point() else expected[name]
        assert value.dtype == expected[name].dtype, name
        assert_bitwise_equal([want], [value])


def test_unsupported_save_dtype_is_rejected(tmp_path):
    """Only fp32/fp16/bf16 can be saved; anything else is refused before a file is written."""
    with pytest.raises(ValueError, match="dtype must be one of"):
        save_adapter(build(CONFIGS["default"]), tmp_path / "a.safetensors", dtype=torch.float64)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------- paper budget
@pytest.fixture(scope="module")
def vit_base_segmenter():
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False, dynamic_img_size=True)
    return apply_gopt(model, aux_channels=1, num_classes=40, interval=1)


def test_vit_base_budget(vit_base_segmenter, tmp_path):
    """ViT-B, 40 classes, depth aux, defaults: <= 0.97M trainable parameters (paper) and a fp32
    adapter file <= 4 MB; only the adapter trains."""
    trainable, total = count_parameters(vit_base_segmenter)
    assert trainable <= 970_000
    assert trainable == count_parameters(vit_base_segmenter.adapter).total
    assert total == trainable + sum(p.numel() for p in vit_base_segmenter.backbone.parameters())
    path = save_adapter(vit_base_segmenter, tmp_path / "vitb.safetensors")
    assert path.stat().st_size <= 4_000_000


# ------------------------------------------------------------- corrupt / foreign files
def test_truncation_at_key_points_is_rejected(files, tmp_path):
    """Cuts at 0, inside the length prefix, inside the header, at the header end and one byte short."""
    data = (files / "default.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", data[:8])
    segmenter = target()
    for length in (0, 1, 7, 8, 9, 8 + header_len // 2, 8 + header_len, 8 + header_len + 1, len(data) - 1):
        path = tmp_path / f"cut{length}.safetensors"
        path.write_bytes(data[:length])
        assert_rejected(segmenter, path, "truncated|too short")


@fast(60)
@given(data=st.data())
def test_any_truncation_is_rejected(files, data):
    """A file cut at any length in [0, size) is refused and the segmenter is left exactly as it was."""
    blob = (files / "default.safetensors").read_bytes()
    length = data.draw(st.integers(0, len(blob) - 1), label="length")
    segmenter = target()
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "cut.safetensors"
        path.write_bytes(blob[:length])
        assert_rejected(segmenter, path, "truncated|too short")


def flipped(blob: bytes, bit: int) -> bytes:
    out = bytearray(blob)
    out[bit // 8] ^= 1 << (bit % 8)
    return bytes(out)


@fast(150)
@given(data=st.data())
def test_any_single_bit_flip_is_rejected(files, data):
    """Flipping any one bit anywhere in the file (length prefix, header JSON, padding or tensor
    bytes) is detected before a weight is copied; the error names the file."""
    path = files / "default.safetensors"
    blob = path.read_bytes()
    bit = data.draw(st.integers(0, len(blob) * 8 - 1), label="bit")
    segmenter = target()
    with tempfile.TemporaryDirectory() as directory:
        bad = Path(directory) / "flipped.safetensors"
        bad.write_bytes(flipped(blob, bit))
        error = assert_rejected(segmenter, bad, None)
        assert str(bad) in str(error)


@fast(400)
@given(data=st.data())
def test_any_single_bit_flip_in_header_is_rejected(files, data):
    """Same property, concentrated on the 8-byte length prefix and the header JSON (where a parser
    could still accept a damaged file): every flipped bit is refused."""
    blob = (files / "default.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    bit = data.draw(st.integers(0, (8 + header_len) * 8 - 1), label="bit")
    with tempfile.TemporaryDirectory() as directory:
        bad = Path(directory) / "flipped.safetensors"
        bad.write_bytes(flipped(blob, bit))
        with pytest.raises(AdapterError):
            read_adapter_file(bad)


def test_bit_flip_in_tensor_data_is_caught_by_checksum(files, tmp_path):
    """A flipped low mantissa bit in the last tensor byte (valid safetensors, plausible weight) fails the checksum."""
    blob = (files / "default.safetensors").read_bytes()
    bad = tmp_path / "data_flip.safetensors"
    for bit in (8 * (len(blob) - 1), 8 * (len(blob) - 200) + 3):
        bad.write_bytes(flipped(blob, bit))
        assert_rejected(target(), bad, "checksum mismatch")


def test_bit_flip_in_header_json_is_caught(files, tmp_path):
    """Flips inside the header JSON: in the config value (still valid JSON: checksum), in a tensor's
    name (checksum), in the checksum itself, and in a structural character (JSON error)."""
    blob = (files / "default.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", blob[:8])
    header = blob[8 : 8 + header_len]
    cases = [
        (header.index(b"num_classes\\\": 5") + len(b"num_classes\\\": "), 0, "checksum mismatch"),  # 5 -> 4
        (header.index(b'"class_tokens"') + 1, 5, "checksum mismatch"),  # c -> C in a tensor name
        (header.index(b'"checksum":"') + len(b'"checksum":"') + 2, 0, "checksum mismatch"),
        (header.index(b"{"), 1, "corrupt header"),  # '{' -> 'y'
    ]
    for offset, bit, match in cases:
        bad = tmp_path / f"header_flip_{offset}.safetensors"
        bad.write_bytes(flipped(blob, 8 * (8 + offset) + bit))
        assert_rejected(target(), bad, match)


def test_other_backbone_weights_need_allow_backbone_mismatch(files):
    """A file saved on the same architecture with other weights is refused with a message naming
    allow_backbone_mismatch; with allow_backbone_mismatch=True it loads exactly."""
    path = files / "other_weights.safetensors"
    segmenter = target()
    assert_rejected(segmenter, path, "allow_backbone_mismatch=True")
    backbone = snapshot(segmenter.backbone)
    load_adapter(segmenter, path, allow_backbone_mismatch=True)
    stored = read_adapter_file(path).tensors
    assert_states_bitwise_equal({k: stored[k] for k in adapter_state(segmenter)}, adapter_state(segmenter))
    segmenter.add_adapter("again", path, allow_backbone_mismatch=True)
    assert_bitwise_equal(backbone, snapshot(segmenter.backbone))


@pytest.mark.parametrize("file, what", [("depth3.safetensors", "depth"),
                                        ("deit_distilled.safetensors", "num_prefix_tokens")])
def test_other_architecture_is_refused_even_when_allowed(files, file, what):
    """An adapter made for another architecture (deeper, or with other prefix tokens) is refused,
    with or without allow_backbone_mismatch, naming the differing field."""
    segmenter = target()
    assert_rejected(segmenter, files / file, f"another backbone.*{what}")
    assert_rejected(segmenter, files / file, f"another backbone.*{what}", allow_backbone_mismatch=True)


def test_config_mismatch_refused_by_load_but_added_as_task(files):
    """load_adapter needs equal configs (error names num_classes and points to add_adapter);
    add_adapter(name, path) accepts the same file as a new task."""
    path = files / "six_classes.safetensors"
    segmenter = target()
    with Untouched(segmenter):
        with pytest.raises(AdapterError, match="num_classes=6.*add_adapter"):
            load_adapter(segmenter, path)
    segmenter.add_adapter("six", path)
    assert segmenter.get_adapter("six").config.num_classes == 6
    assert segmenter.active_adapter == "default"
    segmenter.set_adapter("six")
    assert outputs(segmenter).shape[1] == 6


@pytest.mark.parametrize("kind", ["random", "text", "empty", "plain_safetensors", "directory"])
def test_non_adapter_files_are_refused(tmp_path, kind):
    """Random bytes, text, an empty file, a plain safetensors file without GoPT metadata and a
    directory are all refused with a message saying what the file is not."""
    path = tmp_path / "file.safetensors"
    match = "not a safetensors file"
    if kind == "random":
        path.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "text":
        path.write_text("GoPT adapter weights, see README\n" * 20)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "plain_safetensors":
        save_file({"class_tokens": torch.zeros(5, 32)}, str(path), metadata={"note": "not gopt"})
        match = "not a GoPT adapter"
    else:
        path.mkdir()
        match = "cannot read adapter file"
    assert_rejected(target(), path, match)


def test_missing_path_is_refused(tmp_path):
    """A path that does not exist gives AdapterError 'no such adapter file' (not FileNotFoundError)."""
    assert_rejected(target(), tmp_path / "nope.safetensors", "no such adapter file")


# ------------------------------------------------------------------- atomic writes
def test_rewriting_a_file_leaves_no_temporary_files(tmp_path):
    """Saving twice to one path replaces the file in place and leaves nothing else in the directory."""
    segmenter = trained(CONFIGS["default"])
    path = tmp_path / "adapter.safetensors"
    save_adapter(segmenter, path)
    perturb_adapter(segmenter, seed=3)
    save_adapter(segmenter, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    stored = read_adapter_file(path).tensors
    assert_states_bitwise_equal(adapter_state(segmenter), {k: stored[k] for k in adapter_state(segmenter)})


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    """If the final rename fails, the old file at the path is intact (still loads) and the temp file is gone."""
    segmenter = trained(CONFIGS["default"])
    path = tmp_path / "adapter.safetensors"
    save_adapter(segmenter, path)
    original = path.read_bytes()
    perturb_adapter(segmenter, seed=3)

    def fail(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(adapter_io.os, "replace", fail)
    with pytest.raises(OSError, match="simulated"):
        save_adapter(segmenter, path)
    monkeypatch.undo()
    assert path.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.safetensors"]
    read_adapter_file(path)


# --------------------------------------------------------------- PEFT-style directories
def test_save_pretrained_from_pretrained_round_trip(tmp_path):
    """save_pretrained writes adapter_config.json (with the config) + weights; from_pretrained on a
    fresh copy of the backbone reproduces the adapter bitwise and the outputs exactly."""
    source = trained(CONFIGS["soft_noacp_linear"])
    source.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    manifest = json.loads((tmp_path / "adapter_config.json").read_text())
    assert manifest["config"] == source.config.to_dict()
    assert manifest["peft_type"] == "GOPT"

    model = make_backbone("vit")
    before = snapshot(model)
    restored = GoptSegmenter.from_pretrained(model, tmp_path)
    assert restored.backbone is model
    assert_bitwise_equal(before, snapshot(restored.backbone))
    assert restored.config == source.config
    assert_states_bitwise_equal(adapter_state(source), adapter_state(restored))
    assert torch.equal(outputs(restored), outputs(source))


@pytest.mark.parametrize("edit", ["num_classes", "missing", "garbage"])
def test_from_pretrained_refuses_bad_manifest_without_touching_model(tmp_path, edit):
    """A manifest disagreeing with the weights (num_classes edited), missing or unparsable gives
    AdapterError, and the model passed in is left exactly as it was (blocks not wrapped, weights,
    requires_grad and mode unchanged)."""
    trained(CONFIGS["default"]).save_pretrained(tmp_path)
    config_path = tmp_path / "adapter_config.json"
    if edit == "num_classes":
        manifest = json.loads(config_path.read_text())
        manifest["config"]["num_classes"] = 9
        config_path.write_text(json.dumps(manifest))
        match = "disagree on the config"
    elif edit == "missing":
        config_path.unlink()
        match = "adapter_config.json: missing"
    else:
        config_path.write_text("{not json")
        match = "adapter_config.json: invalid"

    model = make_backbone("vit").train()
    before = snapshot(model)
    flags = [p.requires_grad for p in model.parameters()]
    with pytest.raises(AdapterError, match=match):
        GoptSegmenter.from_pretrained(model, tmp_path)
    assert all(type(block).__name__ != "PromptedBlock" for block in model.blocks)
    assert_bitwise_equal(before, snapshot(model))
    assert [p.requires_grad for p in model.parameters()] == flags and all(flags)
    assert model.training


def test_from_pretrained_checks_backbone(tmp_path):
    """from_pretrained on other weights is refused (unless allowed) and on another architecture
    always, leaving the model unwrapped."""
    build(CONFIGS["default"]).save_pretrained(tmp_path)
    for model, kwargs, match in [
        (make_backbone("vit", seed=1), {}, "allow_backbone_mismatch"),
        (make_backbone("vit", depth=3), {"allow_backbone_mismatch": True}, "another backbone"),
    ]:
        before = snapshot(model)
        with pytest.raises(AdapterError, match=match):
            GoptSegmenter.from_pretrained(model, tmp_path, **kwargs)
        assert all(type(block).__name__ != "PromptedBlock" for block in model.blocks)
        assert_bitwise_equal(before, snapshot(model))
    GoptSegmenter.from_pretrained(make_backbone("vit", seed=1), tmp_path, allow_backbone_mismatch=True)


def test_fingerprint_describes_backbone_at_save_time(tmp_path):
    """The weights digest written into a file is that of the backbone when the file is saved."""
    segmenter = build(CONFIGS["default"], seed=0)
    save_adapter(segmenter, tmp_path / "before.safetensors")  # computes and caches the digest
    new_weights = make_backbone("vit", seed=1).state_dict().values()
    with torch.no_grad():
        for tensor, value in zip(segmenter.backbone.state_dict().values(), new_weights):
            tensor.copy_(value)
    path = save_adapter(segmenter, tmp_path / "after.safetensors")
    load_adapter(build(CONFIGS["default"], seed=1), path)  # its own (seed-1) weights: must load
    with pytest.raises(AdapterError, match="allow_backbone_mismatch"):
        load_adapter(build(CONFIGS["default"], seed=0), path)  # other weights: must be refused


def test_backbone_never_touched_by_io(files, tmp_path):
    """No save/load path (save_adapter in every dtype, load_adapter, add_adapter, save_pretrained,
    failed loads) writes a backbone tensor or unfreezes a backbone parameter."""
    segmenter = trained(CONFIGS["default"])
    before = snapshot(segmenter.backbone)
    for dtype in (None, torch.float16, torch.bfloat16):
        save_adapter(segmenter, tmp_path / f"a_{dtype}.safetensors", dtype=dtype)
        load_adapter(segmenter, tmp_path / f"a_{dtype}.safetensors")
    segmenter.add_adapter("copy", tmp_path / "a_None.safetensors")
    segmenter.save_pretrained(tmp_path / "dir", adapter_name="copy")
    for bad in ("other_weights.safetensors", "depth3.safetensors", "six_classes.safetensors"):
        with pytest.raises(AdapterError):
            load_adapter(segmenter, files / bad)
    assert_bitwise_equal(before, snapshot(segmenter.backbone))
    assert not any(p.requires_grad for p in segmenter.backbone.parameters())


def test_tensors_of_an_unexpected_dtype_are_refused(tmp_path):
    """A well-formed file whose tensors have a dtype we never write (float64, int32 counters)."""
    from gopt_adapter.adapter_io import encode_adapter

    segmenter = build(CONFIGS["default"], seed=0)
    before = snapshot(segmenter)
    segmenter.adapter.double()
    data = encode_adapter(segmenter.adapter, segmenter.backbone_fingerprint())  # valid checksum, float64 tensors
    segmenter.adapter.float()  # float32 -> float64 -> float32 is exact
    path = tmp_path / "f64.safetensors"
    path.write_bytes(data)
    with pytest.raises(AdapterError, match="dtype torch.float64"):
        load_adapter(segmenter, path)
    assert_bitwise_equal(before, snapshot(segmenter))
