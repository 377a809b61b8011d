"""The package reads one way: no import cycle, a core without dataset readers, a declared adapter contract."""

from __future__ import annotations

import ast
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from gopt_adapter import GoptAdapter, GoptSegmenter, apply_gopt
from gopt_adapter.baselines import VARIANTS, BaselineAdapter, BaselineSegmenter, build_variant
from gopt_adapter.contract import SegmentationAdapter, check_adapter
from gopt_adapter.segmenter import PromptedSegmenter
from conftest import assert_bitwise_equal, make_backbone, snapshot

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "gopt_adapter"


def module_name(path: Path, package_dir: Path) -> str:
    parts = path.relative_to(package_dir.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (top level, functions,
    ``if TYPE_CHECKING:`` blocks), read with ``ast``: ``from .x import y`` names module
    ``x.y`` when that is a module, else ``x``; ``from . import __version__`` names the package."""
    files = {module_name(path, package_dir): path for path in package_dir.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                    origin = ".".join(base + ([node.module] if node.module else []))
                else:
                    origin = node.module or ""
                targets = [f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in files else origin
                           for alias in node.names]
            else:
                continue
            edges.update(target for target in targets if target in files and target != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path ``[a, b, ..., a]``, or ``None`` (depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_sees_a_cycle_through_a_type_checking_import(tmp_path):
    """The situation before this check: a -> b at run time, b -> a under TYPE_CHECKING, and the
    package's __init__ imported back by a submodule for __version__."""
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("from .a import f\n")
    (package / "a.py").write_text("from .b import g\n\ndef f():\n    from . import c\n")
    (package / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .a import f\n")
    (package / "c.py").write_text("import os\n")
    graph = import_graph(package)
    assert graph == {"pkg": {"pkg.a"}, "pkg.a": {"pkg.b", "pkg.c"}, "pkg.b": {"pkg.a"}, "pkg.c": set()}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]
    (package / "b.py").write_text("from . import __version__\n")
    assert find_cycle(import_graph(package)) == ["pkg", "pkg.a", "pkg.b", "pkg"]
    (package / "b.py").write_text("import os\n")
    assert find_cycle(import_graph(package)) is None


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for target in graph[todo.pop()] - seen:
            seen.add(target)
            todo.append(target)
    return seen


def test_no_import_cycle_among_the_package_modules():
    graph = import_graph(PACKAGE)
    assert {"gopt_adapter.model", "gopt_adapter.adapter_io", "gopt_adapter.datasets.base"} <= set(graph)
    assert "gopt_adapter.adapter_io" in graph["gopt_adapter.model"]  # the graph sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def test_the_file_format_knows_no_model_and_the_public_api_no_reader():
    """Statically, lazy imports included: adapter_io reaches no adapter or segmenter, and
    nothing gopt_adapter/__init__.py imports reaches a dataset reader or the CLI layer."""
    graph = import_graph(PACKAGE)
    assert not reachable(graph, "gopt_adapter.adapter_io") & {
        "gopt_adapter.adapter", "gopt_adapter.model", "gopt_adapter.segmenter", "gopt_adapter.baselines"}
    core = reachable(graph, "gopt_adapter")
    assert {"gopt_adapter.model", "gopt_adapter.scaling"} <= core
    assert not {m for m in core if m.startswith("gopt_adapter.datasets")}
    assert not core & {"gopt_adapter.cli", "gopt_adapter.predict", "gopt_adapter.visualize", "gopt_adapter.recipe"}


def test_importing_the_package_loads_no_dataset_reader_pil_or_tifffile():
    code = ("import gopt_adapter, sys; print(sorted(m for m in sys.modules "
            "if m.startswith(('PIL', 'tifffile', 'gopt_adapter.datasets'))))")
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
        assert isinstance(segmenter, GoptSegmenter if name.startswith("gopt") else BaselineSegmenter), name
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
    for cls in (PromptedSegmenter, GoptSegmenter, BaselineSegmenter):
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
    """Neither segmenter overrides an inherited method to refuse it: what one does not have, it
    does not inherit."""
    for cls in (PromptedSegmenter, GoptSegmenter, BaselineSegmenter):
        assert issubclass(cls, PromptedSegmenter)
    assert not issubclass(BaselineSegmenter, GoptSegmenter)
    gopt_only = {"save_pretrained", "from_pretrained", "from_adapter_file", "add_adapter", "set_adapter",
                 "delete_adapter", "get_adapter", "forward_mixed", "backbone_fingerprint"}
    assert gopt_only <= set(vars(GoptSegmenter))
    assert not gopt_only & set(dir(PromptedSegmenter)) and not gopt_only & set(dir(BaselineSegmenter))
    segmenter = apply_gopt(make_backbone("vit", depth=2), 1, 3, hidden_dim=8)
    assert isinstance(segmenter, PromptedSegmenter) and isinstance(segmenter.adapter, SegmentationAdapter)


@pytest.mark.parametrize("name", ["fft", "vpt_deep"])
def test_the_shared_base_serves_baselines_remove_count_export_and_aux_missing(name):
    """remove_gopt gives a baseline's timm model back as it was, count_parameters counts it,
    export_onnx accepts it (refusing only the bad size), and the aux-missing path names it."""
    from gopt_adapter import count_parameters, export_onnx, remove_gopt
    from gopt_adapter.aux_faults import WithoutAux

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
