"""The package keeps its shape: `import gopt_adapter` loads only the core, a declared adapter contract,
and base classes that know nothing of their subclasses."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gopt_adapter import GoptAdapter, GoptSegmenter, apply_gopt
from gopt_adapter.baselines import VARIANTS, BaselineAdapter, BaselineSegmenter, TwoStreamSegmenter, build_variant
from gopt_adapter.contract import SegmentationAdapter, check_adapter
from gopt_adapter.segmenter import PromptedSegmenter, SegmenterBase
from model_helpers import assert_bitwise_equal, make_backbone, snapshot

ROOT = Path(__file__).resolve().parents[1]


def test_importing_the_package_loads_no_reader_engine_baseline_or_command():
    """What ``gopt_adapter/__init__.py`` imports at run time (the layers of the modules it names
    are import-linter's contracts in pyproject.toml, run by scripts/test.sh)."""
    code = ("import gopt_adapter, sys; print(sorted(m for m in sys.modules if m.startswith(('PIL', 'tifffile', "
            "'gopt_adapter.data', 'gopt_adapter.train', 'gopt_adapter.baselines', 'gopt_adapter.cli'))))")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


# ----------------------------------------------------------------- adapter contract
def test_gopt_and_every_baseline_adapter_implement_the_contract():
    names = [name for name, variant in VARIANTS.items() if variant.fixed.get("interval", 1) <= 2
             and (name != "lora" or importlib.util.find_spec("peft") is not None)]
    for name in names:
        options = {"hidden_dim": 8} if name.startswith("gopt") else {}
        segmenter = build_variant(name, make_backbone("vit", depth=2), 1, 3, **options)
        expected = GoptSegmenter if name.startswith("gopt") else TwoStreamSegmenter if name == "fft" else \
            BaselineSegmenter
        assert isinstance(segmenter, expected), name
        assert isinstance(segmenter.adapter, SegmentationAdapter), name
        assert isinstance(segmenter.adapter, GoptAdapter if name.startswith("gopt") else BaselineAdapter), name
        check_adapter(segmenter.adapter)


class _NoPrompt(nn.Module):
    """Has a head and a config, but no ``prompt``/``prompts_at``/``initial_state``."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(32, 3, 1)
        self.config = object()


class _BareConfig(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Conv2d(32, 3, 1)
        self.config = object()

    def initial_state(self, aux):
        return aux

    def prompts_at(self, block_index):
        return False

    def prompt(self, block_index, x, state):
        return x, state


@pytest.mark.parametrize("adapter, named", [
    (_NoPrompt(), "it has no initial_state, prompts_at, prompt"),
    (_BareConfig(), "its config has no aux_channels, num_classes"),
    (lambda x: x, "not an nn.Module"),
])
def test_a_segmenter_refuses_an_adapter_outside_the_contract_before_touching_the_model(adapter, named):
    from gopt_adapter.backbone import BackboneSpec

    model = make_backbone("vit", depth=2)
    before = snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for cls in (PromptedSegmenter, GoptSegmenter, BaselineSegmenter, TwoStreamSegmenter):
        with pytest.raises(TypeError, match=named):
            cls(model, BackboneSpec.from_model(model), adapter)
    assert_bitwise_equal(before, snapshot(model))
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    assert not any(type(block).__name__ == "PromptedBlock" for block in model.blocks)


def test_a_duck_typed_adapter_runs_in_the_shared_segmenter():
    """The contract is structural: an adapter that subclasses nothing of ours runs, and its
    ``prompt`` sees every block's input in order."""
    from gopt_adapter.backbone import BackboneSpec

    class Config:
        aux_channels, num_classes = 1, 3

    class Recorder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.config = Config()
            self.head = nn.Conv2d(32, 3, 1)
            self.seen: list[int] = []

        def initial_state(self, aux):
            return aux.shape[0]

        def prompts_at(self, block_index):
            return False

        def prompt(self, block_index, x, state):
            self.seen.append(block_index)
            assert state == x.shape[0]
            return x, state

    model = make_backbone("vit", depth=2)
    adapter = Recorder()
    segmenter = PromptedSegmenter(model, BackboneSpec.from_model(model), adapter).eval()
    rgb, aux = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        logits = segmenter(rgb, aux)
        expected = segmenter.upsample(adapter.head(segmenter.backbone_features(rgb)), (32, 32))
    assert logits.shape == (2, 3, 32, 32) and adapter.seen == [0, 1]
    torch.testing.assert_close(logits, expected)


def test_baselines_and_gopt_share_a_base_that_refuses_nothing():
    """No segmenter overrides an inherited method to refuse it: what one does not have, it does
    not inherit. GoPT's aux-missing mode and adapter files live with GoPT; the single-stream RGB
    pass is not the two-stream FFT's."""
    for cls in (PromptedSegmenter, GoptSegmenter, BaselineSegmenter, TwoStreamSegmenter):
        assert issubclass(cls, SegmenterBase)
    assert not issubclass(BaselineSegmenter, GoptSegmenter)
    gopt_only = {"save_pretrained", "from_pretrained", "from_adapter_file", "add_adapter", "set_adapter",
                 "delete_adapter", "get_adapter", "forward_mixed", "backbone_fingerprint", "_missing_aux_inputs"}
    assert gopt_only <= set(vars(GoptSegmenter))
    for cls in (SegmenterBase, PromptedSegmenter, BaselineSegmenter, TwoStreamSegmenter):
        assert not gopt_only & set(dir(cls)), cls
    single_stream = {"backbone_features", "_prompted_features"}
    assert single_stream <= set(vars(PromptedSegmenter))
    assert not single_stream & (set(dir(TwoStreamSegmenter)) | set(dir(SegmenterBase)))
    segmenter = apply_gopt(make_backbone("vit", depth=2), 1, 3, hidden_dim=8)
    assert isinstance(segmenter, SegmenterBase) and isinstance(segmenter.adapter, SegmentationAdapter)


@pytest.mark.parametrize("name", ["fft", "vpt_deep"])
def test_the_shared_base_serves_baselines_remove_count_export_and_aux_missing(name):
    """remove_gopt gives a baseline's timm model back as it was, count_parameters counts it,
    export_onnx accepts it (refusing only the bad size), and the aux-missing path names it."""
    from gopt_adapter import count_parameters, export_onnx, remove_gopt
    from gopt_adapter.data.aux_faults import WithoutAux

    model = make_backbone("vit", depth=2).train()
    model.blocks[0].requires_grad_(False)
    flags = {key: p.requires_grad for key, p in model.named_parameters()}
    modes = {key: m.training for key, m in model.named_modules()}
    keys = list(model.state_dict())
    tree = [(key, type(module)) for key, module in model.named_modules()]
    segmenter = build_variant(name, model, 1, 3)
    counted = count_parameters(segmenter)
    assert counted.total == sum(p.numel() for p in segmenter.parameters())
    assert counted.trainable == sum(p.numel() for p in segmenter.parameters() if p.requires_grad) > 0
    with pytest.raises(ValueError, match="two positive integers"):
        export_onnx(segmenter, "unused.onnx", (32,))
    with pytest.raises(ValueError, match="no aux-missing mode"):
        WithoutAux(segmenter)(torch.randn(1, 3, 32, 32), torch.randn(1, 1, 32, 32))
    restored = remove_gopt(segmenter)
    assert restored is model and list(model.state_dict()) == keys
    assert [(key, type(module)) for key, module in model.named_modules()] == tree
    assert {key: p.requires_grad for key, p in model.named_parameters()} == flags
    assert {key: m.training for key, m in model.named_modules()} == modes
    with pytest.raises(TypeError, match="remove_gopt needs a segmenter"):
        remove_gopt(model)
