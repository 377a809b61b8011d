"""Adapter files: exact round trips, compact dtypes, the paper's size budget, and all-or-nothing loading.

Every failure case must raise :class:`AdapterError` with a message naming what is wrong and
leave the segmenter exactly as it was (every state tensor bitwise, the active adapter and the
set of adapters). The frozen backbone is never written by any save or load path.
"""

from __future__ import annotations

import copy
import json
import os
import random
import stat
import struct
import tempfile
from pathlib import Path

import pytest
import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

import gopt_adapter.adapter_file as adapter_io
from model_helpers import assert_bitwise_equal, family_inputs, make_backbone, perturb_adapter, snapshot
from gopt_adapter import (
    AdapterError,
    GoptConfig,
    GoptSegmenter,
    Preprocessing,
    apply_gopt,
    count_parameters,
    load_adapter,
    read_adapter_file,
    save_adapter,
)
from gopt_adapter.preprocessing import NormalizeConfig

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



@pytest.fixture(scope="module")
def shared_target():
    """One :func:`target` for the property tests' many examples: each rejection leaves it exactly
    as it was (``assert_rejected`` checks), so every example sees the same segmenter."""
    return target()

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
def test_any_truncation_is_rejected(files, shared_target, data):
    """A file cut at any length in [0, size) is refused and the segmenter is left exactly as it was."""
    blob = (files / "default.safetensors").read_bytes()
    length = data.draw(st.integers(0, len(blob) - 1), label="length")
    segmenter = shared_target
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
def test_any_single_bit_flip_is_rejected(files, shared_target, data):
    """Flipping any one bit anywhere in the file (length prefix, header JSON, padding or tensor
    bytes) is detected before a weight is copied; the error names the file."""
    path = files / "default.safetensors"
    blob = path.read_bytes()
    bit = data.draw(st.integers(0, len(blob) * 8 - 1), label="bit")
    segmenter = shared_target
    with tempfile.TemporaryDirectory() as directory:
        bad = Path(directory) / "flipped.safetensors"
        bad.write_bytes(flipped(blob, bit))
        error = assert_rejected(segmenter, bad, None)
        assert str(bad) in str(error)


@fast(400)
@given(data=st.data())
def test_any_single_bit_flip_in_header_is_rejected(files, shared_target, data):
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


@pytest.mark.parametrize("value, dtype", [(float("nan"), None), (float("-inf"), None), (1e6, torch.float16)])
def test_non_finite_weights_are_never_written(tmp_path, value, dtype):
    """A NaN or inf weight (or one that only overflows in the file's dtype: 1e6 is inf in
    float16) is refused with AdapterError naming it: no new file, an old one left as it was."""
    segmenter = trained(CONFIGS["default"])
    old, fresh = tmp_path / "old.safetensors", tmp_path / "fresh.safetensors"
    save_adapter(segmenter, old, dtype=dtype)
    original = old.read_bytes()
    name, param = next(iter(segmenter.adapter.named_parameters()))
    with torch.no_grad():
        param.view(-1)[0] = value
    for path in (old, fresh):
        with pytest.raises(AdapterError, match=f"refusing to write 1 of .* NaN or inf values \\({name}\\)"):
            save_adapter(segmenter, path, dtype=dtype)
    assert old.read_bytes() == original
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.safetensors"]  # no fresh file, no temporary


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
    from gopt_adapter.gopt_segmenter import adapter_bytes

    segmenter = build(CONFIGS["default"], seed=0)
    before = snapshot(segmenter)
    segmenter.adapter.double()
    data = adapter_bytes(segmenter.adapter, segmenter.backbone_fingerprint())  # valid checksum, float64 tensors
    segmenter.adapter.float()  # float32 -> float64 -> float32 is exact
    path = tmp_path / "f64.safetensors"
    path.write_bytes(data)
    with pytest.raises(AdapterError, match="dtype torch.float64"):
        load_adapter(segmenter, path)
    assert_bitwise_equal(before, snapshot(segmenter))


# ------------------------------------------------------------- files that fit badly
def doctored_file(tmp_path, segmenter, doctor) -> Path:
    """A file written by the library's own encoder (valid checksum) from a doctored copy of the adapter."""
    from gopt_adapter.gopt_segmenter import adapter_bytes

    adapter = copy.deepcopy(segmenter.adapter)
    doctor(adapter)
    path = tmp_path / "doctored.safetensors"
    path.write_bytes(adapter_bytes(adapter, segmenter.backbone_fingerprint()))
    read_adapter_file(path)  # the checksum holds: only the tensor check can refuse it
    return path


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    """Files with a valid checksum whose tensors do not fit the adapter: missing (class_tokens),
    unexpected (an extra buffer) or of another shape (class_tokens [C, r+1]) are refused by
    load_adapter and add_adapter, naming the tensor, and nothing changes."""
    segmenter = target()

    def drop(adapter):
        del adapter.class_tokens

    def extra(adapter):
        adapter.register_buffer("stray", torch.zeros(3))

    def reshape(adapter):
        groups, width = adapter.class_tokens.shape
        adapter.class_tokens = torch.nn.Parameter(torch.zeros(groups, width + 1))

    for doctor, match in [(drop, r"missing \['class_tokens'\], unexpected \[\]"),
                          (extra, r"missing \[\], unexpected \['stray'\]"),
                          (reshape, r"shape/dtype \['class_tokens \(\d+, \d+\) != \(\d+, \d+\)'\]")]:
        assert_rejected(segmenter, doctored_file(tmp_path, segmenter, doctor), match)


# ------------------------------------------------------------------ preprocessing
NYU = Preprocessing(aux_scale="fixed", aux_max=10_000,
                    normalize=NormalizeConfig(aux_mean=(0.2,), aux_std=(0.3,)))


def test_preprocessing_round_trips_through_every_load_path(tmp_path):
    """adapter.preprocessing is saved, covered by the checksum, and restored by read_adapter_file,
    load_adapter, add_adapter and from_pretrained; a file without one gives None everywhere."""
    source = trained(CONFIGS["default"])
    assert source.adapter.preprocessing is None
    plain = save_adapter(source, tmp_path / "plain.safetensors")
    source.adapter.preprocessing = NYU
    path = save_adapter(source, tmp_path / "nyu.safetensors")
    source.save_pretrained(tmp_path / "nyu_dir")

    assert read_adapter_file(plain).preprocessing is None
    assert read_adapter_file(path).preprocessing == NYU
    loaded = build(CONFIGS["default"])
    load_adapter(loaded, path)
    assert loaded.adapter.preprocessing == NYU
    load_adapter(loaded, plain)  # the file's weights come with the file's (absent) preprocessing
    assert loaded.adapter.preprocessing is None
    loaded.add_adapter("nyu", path)
    assert loaded.get_adapter("nyu").preprocessing == NYU and loaded.adapter.preprocessing is None
    restored = GoptSegmenter.from_pretrained(make_backbone("vit"), tmp_path / "nyu_dir")
    assert restored.adapter.preprocessing == NYU
    assert Preprocessing.from_dict(NYU.to_dict()) == NYU

    blob = path.read_bytes()
    assert blob.count(b"10000.0") == 1  # aux_max in the header: 10000 -> 20000 must fail the checksum
    bad = tmp_path / "edited.safetensors"
    bad.write_bytes(blob.replace(b"10000.0", b"20000.0"))
    assert_rejected(target(), bad, "checksum mismatch")


def test_invalid_stored_preprocessing_is_refused(tmp_path):
    """A file whose preprocessing metadata is invalid (but checksummed) is an AdapterError naming it;
    so is one whose aux mean has more values than the adapter has aux channels."""
    from safetensors.torch import load_file, safe_open

    source = build(CONFIGS["default"])
    source.adapter.preprocessing = NYU
    path = save_adapter(source, tmp_path / "nyu.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    for field, value in [("aux_scale", "log"), ("aux_max", -1), ("normalize", {"aux_mean": [0.1, 0.2]})]:
        stored = json.loads(metadata["preprocessing"])
        stored[field] = {**stored["normalize"], **value} if field == "normalize" else value
        edited = {**metadata, "preprocessing": json.dumps(stored)}
        (tmp_path / "bad.safetensors").write_bytes(adapter_io.seal(tensors, edited))  # a valid checksum
        with pytest.raises(AdapterError, match="invalid preprocessing"):
            read_adapter_file(tmp_path / "bad.safetensors")


def test_preprocessing_is_validated(tmp_path):
    with pytest.raises(ValueError, match="aux_scale must be one of"):
        Preprocessing(aux_scale="log")
    with pytest.raises(ValueError, match="aux_max must be a finite number > 0"):
        Preprocessing(aux_max=0)
    with pytest.raises(ValueError, match="only applies to aux_scale 'fixed'"):
        Preprocessing(aux_scale="per_image", aux_max=255)
    with pytest.raises(ValueError, match="normalize must be a NormalizeConfig"):
        Preprocessing(normalize={"aux_mean": (0.5,)})
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        Preprocessing.from_dict({"aux_scale": "fixed", "mean": 0.5})
    with pytest.raises(TypeError, match="must be a Preprocessing"):
        build(CONFIGS["default"]).adapter.preprocessing = NYU.to_dict()
    assert NYU.override(aux_scale="per_image") == Preprocessing("per_image", None, NYU.normalize)
    assert NYU.override(aux_max=255.0, aux_std=(0.1,)).normalize.aux_std == (0.1,)
    segmenter = build(CONFIGS["default"])  # 1 aux channel: two aux means cannot be saved
    segmenter.adapter.preprocessing = Preprocessing(normalize=NormalizeConfig(aux_mean=(0.1, 0.2)))
    with pytest.raises(ValueError, match="aux_mean has 2 values for 1 aux channel"):
        save_adapter(segmenter, tmp_path / "never_written.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_dataset_preprocessing_reproduces_the_readers_samples(tmp_path):
    """Applying dataset_preprocessing(dataset) to the raw files, as gopt predict does, gives the
    dataset's own normalised sample: NYUDv2 millimetre depth (fixed / 10000), HHA (dtype
    maximum) and MFNet thermal scaled per image, each with the transform's mean/std."""
    from types import SimpleNamespace

    from datasets_helpers import make_mfnet, make_nyudv2
    from gopt_adapter.data import get_dataset
    from gopt_adapter.cli.predict import read_pair
    from gopt_adapter.preprocessing import dataset_preprocessing
    from gopt_adapter.data.transforms import build_transforms

    make_nyudv2(tmp_path / "NYUDepthv2", {"test": ["0001"]}, hha=True)
    make_mfnet(tmp_path / "MFNet", {"test": ["00001D"]}, layout="folders")
    norm = NormalizeConfig(aux_mean=(0.3,), aux_std=(0.2,))
    cases = [
        ("nyudv2", {}, "Depth/0001.png", Preprocessing("fixed", 10_000.0, norm)),
        ("nyudv2", {"aux": "hha"}, "HHA/0001.jpg", Preprocessing("fixed", None, norm)),
        ("mfnet", {"thermal_normalization": "per_image"}, "Thermal/00001D.png", Preprocessing("per_image", None, norm)),
    ]
    for name, options, aux_file, expected in cases:
        root = tmp_path / ("NYUDepthv2" if name == "nyudv2" else "MFNet")
        dataset = get_dataset(name, root=root, split="test", transform=build_transforms(name, False, normalize=norm),
                              **options)
        preprocessing = dataset_preprocessing(dataset)
        assert preprocessing == expected, (name, options)
        sample = dataset[0]
        rgb_file = next((root / "RGB").iterdir())
        pair = read_pair(rgb_file, root / aux_file, dataset.aux_channels, preprocessing.aux_scale,
                         preprocessing.aux_max)
        norm_used = preprocessing.normalize
        aux = (torch.from_numpy(pair.aux).permute(2, 0, 1) - torch.tensor(norm_used.aux_mean).view(-1, 1, 1)) \
            / torch.tensor(norm_used.aux_std).view(-1, 1, 1)
        torch.testing.assert_close(aux, sample["aux"])
    with pytest.raises(ValueError, match="cannot tell the normalisation"):
        dataset_preprocessing(SimpleNamespace(aux_channels=1, transform=lambda sample: sample))
    assert dataset_preprocessing(SimpleNamespace(aux_channels=1, transform=None)).normalize.rgb_std == (1.0, 1.0, 1.0)


# ------------------------------------------------------------------ file modes
@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_honour_the_umask_and_rewrites_keep_the_mode(tmp_path, umask):
    segmenter = build(CONFIGS["default"])
    old = os.umask(umask)
    try:
        path = save_adapter(segmenter, tmp_path / "adapter.safetensors")
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
        path.chmod(0o640)
        save_adapter(segmenter, path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    finally:
        os.umask(old)


# ------------------------------------------------------------------ digest cache
def test_backbone_digest_is_cached_across_saves_but_sees_data_edits(tmp_path, monkeypatch):
    """Several saves hash the backbone once; an edit through .data (no version bump) is seen and
    the next file records the digest of the edited weights."""
    import gopt_adapter.gopt_segmenter as model_module
    from gopt_adapter.backbone import weights_digest

    calls = []

    def counting(module):
        calls.append(module)
        return weights_digest(module)

    monkeypatch.setattr(model_module, "weights_digest", counting)
    segmenter = build(CONFIGS["default"])
    for index in range(3):
        save_adapter(segmenter, tmp_path / f"a{index}.safetensors")
    segmenter.save_pretrained(tmp_path / "dir")
    assert len(calls) == 1
    first = read_adapter_file(tmp_path / "a0.safetensors").backbone["weights_sha256"]

    weight = segmenter.backbone.blocks[1].block.mlp.fc1.weight
    version = weight._version
    weight.data.mul_(2)
    assert weight._version == version  # what the probe exists for
    path = save_adapter(segmenter, tmp_path / "edited.safetensors")
    save_adapter(segmenter, tmp_path / "edited_again.safetensors")
    assert len(calls) == 2
    recorded = read_adapter_file(path).backbone["weights_sha256"]
    assert recorded != first and recorded == weights_digest(segmenter.backbone)

    restored = GoptSegmenter.from_pretrained(make_backbone("vit"), tmp_path / "dir")  # digest computed on wrap
    save_adapter(restored, tmp_path / "restored.safetensors")
    assert len(calls) == 3

    weight.data.view(-1)[1] += 1.0  # one element off the sampled grid: the cheap check cannot see it
    assert segmenter.backbone_fingerprint()["weights_sha256"] == recorded
    refreshed = segmenter.backbone_fingerprint(refresh=True)["weights_sha256"]
    assert refreshed != recorded and refreshed == weights_digest(segmenter.backbone)


def test_files_of_another_format_version_name_it(tmp_path):
    """A file of an older format version (2: per-token LayerNorm on the aux tokens) is refused naming
    both versions, not as corrupt."""
    from safetensors.torch import load_file, safe_open

    path = save_adapter(build(CONFIGS["default"]), tmp_path / "a.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    old = tmp_path / "v2.safetensors"
    old.write_bytes(adapter_io.seal(load_file(str(path)), {**metadata, "format_version": "2"}))
    assert_rejected(target(), old, "adapter format version '2'; this library reads '3'")


# ------------------------------------------------------- from_pretrained leaves the model alone
def model_state(model):
    return (snapshot(model), {n: p.requires_grad for n, p in model.named_parameters()},
            [(n, type(m), m.training) for n, m in model.named_modules()])


@pytest.mark.parametrize("case", ["dotted_name", "empty_name", "number_name", "other_weights", "already_wrapped"])
def test_from_pretrained_failures_leave_the_model_unchanged(tmp_path, case):
    """Every refusal happens before the model is touched: weights, requires_grad, module types and
    every module's mode are as before."""
    build(CONFIGS["default"]).save_pretrained(tmp_path)
    model = make_backbone("vit", seed=1 if case == "other_weights" else 0).train()
    model.blocks[0].requires_grad_(False)
    kwargs = {"dotted_name": dict(adapter_name="a.b"), "empty_name": dict(adapter_name=""),
              "number_name": dict(adapter_name=3)}.get(case, {})
    if case == "already_wrapped":
        model = apply_gopt(model, aux_channels=1, num_classes=5).backbone
    before = model_state(model)
    with pytest.raises((ValueError, AdapterError)):
        GoptSegmenter.from_pretrained(model, tmp_path, **kwargs)
    after = model_state(model)
    assert_bitwise_equal(before[0], after[0])
    assert before[1:] == after[1:]


def test_class_names_and_timm_model_are_recorded_and_files_without_them_still_load(tmp_path):
    """What gopt predict / eval need to rebuild the backbone (name, kwargs) and label the classes;
    files written before these keys existed load with None, and invalid values are refused."""
    from safetensors.torch import load_file, safe_open

    from gopt_adapter.backbone import create_backbone
    from gopt_adapter.gopt_segmenter import backbone_for_adapter, restore_segmenter

    kwargs = {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 64}
    torch.manual_seed(0)
    segmenter = apply_gopt(create_backbone("vit_base_patch16_224", None, kwargs), 1, 3)
    perturb_adapter(segmenter)
    segmenter.adapter.class_names = ["sky", "road", "car"]
    path = save_adapter(segmenter, tmp_path / "named.safetensors")
    file = read_adapter_file(path)
    assert file.class_names == ("sky", "road", "car")
    assert (file.backbone_name, file.backbone_kwargs) == ("vit_base_patch16_224", kwargs)
    # the one rebuild path: same seed, same random weights -> the fingerprint accepts it
    torch.manual_seed(0)
    assert backbone_for_adapter(file).embed_dim == 32
    restored, _ = restore_segmenter(path, seed=0)
    assert restored.adapter.class_names == ("sky", "road", "car")
    rgb, aux = torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(restored(rgb, aux), segmenter.eval()(rgb, aux))
    with pytest.raises(AdapterError, match="trained on other backbone weights"):
        restore_segmenter(path, seed=1)
    copy_path = save_adapter(restored, tmp_path / "again.safetensors")  # names survive a load -> save
    assert read_adapter_file(copy_path).class_names == ("sky", "road", "car")

    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    tensors = load_file(str(path))
    old = {k: v for k, v in metadata.items() if k not in ("class_names", "timm_model")}
    (tmp_path / "old.safetensors").write_bytes(adapter_io.seal(tensors, old))
    old_file = read_adapter_file(tmp_path / "old.safetensors")
    assert (old_file.class_names, old_file.backbone_name, old_file.backbone_kwargs) == (None, None, None)
    with pytest.raises(AdapterError, match="records no timm model name"):
        backbone_for_adapter(old_file)
    assert backbone_for_adapter(old_file, backbone="vit_base_patch16_224", backbone_kwargs=kwargs).embed_dim == 32
    for key, value in [("class_names", json.dumps(["a", "b"])), ("class_names", json.dumps([1, 2, 3])),
                       ("timm_model", json.dumps({"kwargs": {}})),
                       ("timm_model", json.dumps({"name": "x", "kwargs": 3}))]:
        (tmp_path / "bad.safetensors").write_bytes(adapter_io.seal(tensors, {**metadata, key: value}))
        with pytest.raises(AdapterError, match="invalid adapter metadata"):
            read_adapter_file(tmp_path / "bad.safetensors")
    with pytest.raises(ValueError, match="2 class names for an adapter of 3 classes"):
        segmenter.adapter.class_names = ["a", "b"]


def test_the_file_format_round_trips_contents_without_any_model(tmp_path):
    """adapter_io alone: plain tensors, a config and metadata -> bytes -> the same contents,
    no adapter or segmenter built; what it cannot store is refused before any byte is made."""
    from gopt_adapter import GoptConfig, Preprocessing

    config = GoptConfig(aux_channels=2, num_classes=3, hidden_dim=8)
    tensors = {"a.weight": torch.randn(4, 2), "b.count": torch.arange(3)}
    backbone = {"class_name": "VisionTransformer", "embed_dim": 32, "weights_sha256": "ab" * 32}
    preprocessing = Preprocessing("fixed", 10000.0, NormalizeConfig(aux_mean=(0.5, 0.25), aux_std=(0.5, 0.5)))
    origin = {"name": "vit_tiny_patch16_224", "kwargs": {"depth": 2}}
    path = tmp_path / "plain.safetensors"
    path.write_bytes(adapter_io.encode_adapter(config, tensors, backbone, preprocessing=preprocessing,
                                               class_names=["x", "y", "z"], origin=origin, dtype=torch.float16))
    file = read_adapter_file(path)
    assert (file.config, file.backbone, file.preprocessing) == (config, backbone, preprocessing)
    assert (file.class_names, file.backbone_name, file.backbone_kwargs) == (("x", "y", "z"), *origin.values())
    assert file.tensors["a.weight"].dtype == torch.float16 and file.tensors["b.count"].dtype == torch.int64
    assert torch.equal(file.tensors["a.weight"], tensors["a.weight"].half())
    assert torch.equal(file.tensors["b.count"], tensors["b.count"])
    with pytest.raises(ValueError, match="2 class names for an adapter of 3 classes"):
        adapter_io.encode_adapter(config, tensors, backbone, class_names=["x", "y"])
    with pytest.raises(TypeError, match="GoptConfig"):
        adapter_io.encode_adapter(object(), tensors, backbone)
