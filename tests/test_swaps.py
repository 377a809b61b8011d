"""Several tasks on one frozen backbone: adding, activating, loading and deleting adapters.

The central property: whatever sequence of adapter operations ran before, a resident adapter
that came from file X computes, in eval mode, bitwise the outputs that X gives on a fresh
segmenter, and the shared backbone is never written.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from model_helpers import assert_bitwise_equal, family_inputs, make_backbone, perturb_adapter, snapshot
from gopt_adapter import AdapterError, GoptConfig, apply_gopt, count_parameters, load_adapter, save_adapter

# Three tasks whose adapters differ in aux channels, classes, interval, assignment, ACP, head, width.
CONFIGS = {
    "A": GoptConfig(aux_channels=1, num_classes=5, interval=1),
    "B": GoptConfig(aux_channels=3, num_classes=7, interval=2, assignment="soft"),
    "C": GoptConfig(aux_channels=1, num_classes=4, use_acp=False, head="linear", hidden_dim=8),
}
NAMES = ["default", "t1", "t2", "t3"]


def new_segmenter(config: GoptConfig):
    """Fresh small ViT (seed 0, depth 2) with a freshly initialised adapter of ``config``."""
    return apply_gopt(make_backbone("vit", depth=2, seed=0), **config.to_dict())


def run(segmenter, name: str | None = None) -> torch.Tensor:
    """Eval-mode logits of adapter ``name`` (the active one by default) on fixed inputs; restores the active adapter."""
    active = segmenter.active_adapter
    if name is not None:
        segmenter.set_adapter(name)
    segmenter.eval()
    rgb, aux = family_inputs("vit", batch=1, aux_channels=segmenter.config.aux_channels)
    with torch.no_grad():
        out = segmenter(rgb, aux)
    segmenter.set_adapter(active)
    return out


@dataclass
class Task:
    path: object
    reference: torch.Tensor


@pytest.fixture(scope="module")
def tasks(tmp_path_factory) -> dict[str, Task]:
    """Each task's adapter perturbed (BN stats moved by a train step) and saved once; its reference
    outputs come from a fresh segmenter that only loaded the file."""
    directory = tmp_path_factory.mktemp("tasks")
    result = {}
    for index, (key, config) in enumerate(CONFIGS.items()):
        source = new_segmenter(config)
        perturb_adapter(source, seed=10 + index)
        source.train()
        rgb, aux = family_inputs("vit", batch=2, aux_channels=config.aux_channels, seed=5)
        with torch.no_grad():
            source(rgb, aux)
        path = save_adapter(source, directory / f"{key}.safetensors")
        fresh = new_segmenter(config)
        load_adapter(fresh, path)
        result[key] = Task(path, run(fresh))
        assert torch.equal(result[key].reference, run(source))
    # the references are distinct, so a swapped-in wrong adapter cannot pass by accident
    assert not torch.equal(result["A"].reference[:, :4], result["C"].reference)
    return result


# ------------------------------------------------------------------ random op sequences
@dataclass
class Model:
    """What the test expects: resident adapter name -> task key it came from (None: fresh weights)."""

    origin: dict[str, str | None] = field(default_factory=lambda: {"default": "A"})
    config: dict[str, GoptConfig] = field(default_factory=lambda: {"default": CONFIGS["A"]})
    active: str = "default"


ops = st.one_of(
    st.tuples(st.just("add_file"), st.sampled_from(NAMES), st.sampled_from(sorted(CONFIGS))),
    st.tuples(st.just("set"), st.sampled_from(NAMES)),
    st.tuples(st.just("add_fresh"), st.sampled_from(NAMES), st.sampled_from(sorted(CONFIGS))),
    st.tuples(st.just("set"), st.sampled_from(NAMES)),
    st.tuples(st.just("load"), st.sampled_from(sorted(CONFIGS))),
    st.tuples(st.just("delete"), st.sampled_from(NAMES)),
)


def apply_op(segmenter, model: Model, op: tuple, tasks: dict[str, Task]) -> None:
    """Runs one operation on the segmenter and on the expectation, checking the errors it must raise."""
    kind, arg = op[0], op[1]
    if kind in ("add_file", "add_fresh"):
        key = op[2]
        source = tasks[key].path if kind == "add_file" else CONFIGS[key]
        if arg in model.origin:
            with pytest.raises(ValueError, match="exists already"):
                segmenter.add_adapter(arg, source)
            return
        segmenter.add_adapter(arg, source)
        model.origin[arg] = key if kind == "add_file" else None
        model.config[arg] = CONFIGS[key]
    elif kind == "set":
        if arg not in model.origin:
            with pytest.raises(KeyError):
                segmenter.set_adapter(arg)
            return
        segmenter.set_adapter(arg)
        model.active = arg
    elif kind == "load":
        if model.config[model.active] != CONFIGS[arg]:
            with pytest.raises(AdapterError, match="config differs"):
                load_adapter(segmenter, tasks[arg].path)
            return
        load_adapter(segmenter, tasks[arg].path)
        model.origin[model.active] = arg
    elif kind == "delete":
        if arg not in model.origin:
            with pytest.raises(KeyError):
                segmenter.delete_adapter(arg)
        elif arg == model.active:
            with pytest.raises(ValueError, match="cannot delete the active adapter"):
                segmenter.delete_adapter(arg)
        else:
            segmenter.delete_adapter(arg)
            del model.origin[arg], model.config[arg]


def check_all(segmenter, model: Model, tasks: dict[str, Task]) -> None:
    """Every resident adapter from file X reproduces X's reference bitwise; bookkeeping agrees."""
    assert sorted(segmenter.adapters) == sorted(model.origin)
    assert segmenter.active_adapter == model.active
    for name, key in model.origin.items():
        assert segmenter.get_adapter(name).config == model.config[name]
        if key is not None:
            assert torch.equal(run(segmenter, name), tasks[key].reference), (name, key)
    assert segmenter.active_adapter == model.active


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(sequence=st.lists(ops, min_size=1, max_size=12))
def test_random_swap_sequences_are_exact(tasks, sequence):
    """After any sequence of add (file or config) / set / load / delete, each resident adapter that
    came from file X gives bitwise X's fresh-segmenter outputs (checked after every step for the
    active adapter, and for all at the end); only the active adapter is trainable; the backbone
    is bitwise unchanged and frozen."""
    segmenter = new_segmenter(CONFIGS["A"])
    backbone = snapshot(segmenter.backbone)
    load_adapter(segmenter, tasks["A"].path)
    model = Model()
    for op in sequence:
        apply_op(segmenter, model, op, tasks)
        key = model.origin[model.active]
        event(f"op {op[0]}")
        if key is not None:
            event("active adapter from a file checked")
            assert torch.equal(run(segmenter), tasks[key].reference), (op, model)
    check_all(segmenter, model, tasks)
    event(f"resident adapters from files at the end: {sum(k is not None for k in model.origin.values())}")
    trainable, total = count_parameters(segmenter)
    assert trainable == count_parameters(segmenter.adapter).total
    assert all(p.requires_grad for p in segmenter.adapter.parameters())
    assert_bitwise_equal(backbone, snapshot(segmenter.backbone))
    assert not any(p.requires_grad for p in segmenter.backbone.parameters())


def test_swap_round_trip_through_every_task(tasks):
    """A deterministic tour: load A, add B and C from files, cycle through all twice in both
    directions; every visit is bitwise its reference and the backbone stays untouched."""
    segmenter = new_segmenter(CONFIGS["A"])
    backbone = snapshot(segmenter.backbone)
    load_adapter(segmenter, tasks["A"].path)
    segmenter.add_adapter("B", tasks["B"].path)
    segmenter.add_adapter("C", tasks["C"].path)
    for name in ["B", "C", "default", "C", "B", "default"] * 2:
        segmenter.set_adapter(name)
        assert torch.equal(run(segmenter), tasks["A" if name == "default" else name].reference), name
    assert_bitwise_equal(backbone, snapshot(segmenter.backbone))


# ---------------------------------------------------------------------- parameter sharing
def test_backbone_counted_once_and_only_active_adapter_trains(tasks):
    """With three adapters resident the backbone's parameters appear once in the total
    (= backbone + every adapter), and the trainable count is exactly the active adapter's."""
    segmenter = new_segmenter(CONFIGS["A"])
    segmenter.add_adapter("B", tasks["B"].path)
    segmenter.add_adapter("C", CONFIGS["C"])
    # adding does not activate: still only 'default' trains
    assert count_parameters(segmenter).trainable == count_parameters(segmenter.get_adapter("default")).total
    backbone = sum(p.numel() for p in segmenter.backbone.parameters())
    adapters = {name: count_parameters(adapter).total for name, adapter in segmenter.adapters.items()}
    assert len(set(adapters.values())) == 3  # different configs, different sizes
    for name in ["default", "B", "C"]:
        segmenter.set_adapter(name)
        trainable, total = count_parameters(segmenter)
        assert total == backbone + sum(adapters.values())
        assert trainable == count_parameters(segmenter.adapter).total == adapters[name]
        assert not any(p.requires_grad for other, a in segmenter.adapters.items() if other != name
                       for p in a.parameters())


# --------------------------------------------------------------------------- misuse errors
def test_adapter_management_errors_change_nothing(tasks):
    """Deleting the active adapter -> ValueError; adding an existing name -> ValueError (from a
    config or a file); setting or deleting an unknown name -> KeyError; nothing changes."""
    segmenter = new_segmenter(CONFIGS["A"])
    segmenter.add_adapter("B", tasks["B"].path)
    before, names = snapshot(segmenter), list(segmenter.adapters)
    with pytest.raises(ValueError, match="cannot delete the active adapter 'default'"):
        segmenter.delete_adapter("default")
    for source in (CONFIGS["C"], tasks["C"].path):
        with pytest.raises(ValueError, match="'B' exists already"):
            segmenter.add_adapter("B", source)
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        segmenter.set_adapter("nope")
    with pytest.raises(KeyError, match="no adapter named 'nope'"):
        segmenter.delete_adapter("nope")
    assert segmenter.active_adapter == "default"
    assert list(segmenter.adapters) == names
    assert_bitwise_equal(before, snapshot(segmenter))
    assert torch.equal(run(segmenter, "B"), tasks["B"].reference)


def test_aux_channels_follow_the_active_adapter(tasks):
    """Each adapter needs aux with its own channel count; the wrong one is a ValueError naming
    the adapter, the expected aux shape and the shapes received."""
    segmenter = new_segmenter(CONFIGS["A"])
    segmenter.add_adapter("B", tasks["B"].path)
    rgb, aux1 = family_inputs("vit", batch=1, aux_channels=1)
    _, aux3 = family_inputs("vit", batch=1, aux_channels=3)
    segmenter.eval()
    with torch.no_grad():
        segmenter(rgb, aux1)
        segmenter.set_adapter("B")
        with pytest.raises(ValueError) as info:
            segmenter(rgb, aux1)
        message = str(info.value)
        assert "'B'" in message and "aux [B, 3, H, W]" in message
        assert re.search(r"rgb \(1, 3, 48, 80\) and aux \(1, 1, 48, 80\)", message)
        assert torch.equal(segmenter(rgb, aux3), tasks["B"].reference)
        segmenter.set_adapter("default")
        with pytest.raises(ValueError, match=r"aux \[B, 1, H, W\].*aux \(1, 3, 48, 80\)"):
            segmenter(rgb, aux3)


def test_each_task_keeps_the_preprocessing_of_its_file(tmp_path):
    """Adapters added from files carry their own stored preprocessing through activation swaps;
    loading a file into the active adapter replaces its preprocessing with the file's."""
    from gopt_adapter import Preprocessing
    from gopt_adapter.preprocessing import NormalizeConfig

    depth = Preprocessing(aux_max=10_000)
    sar = Preprocessing(aux_scale="per_image", normalize=NormalizeConfig(aux_mean=(0.1, 0.2, 0.3), aux_std=(0.4,)))
    paths = {}
    for key, preprocessing in (("A", depth), ("B", sar)):
        source = new_segmenter(CONFIGS[key])
        source.adapter.preprocessing = preprocessing
        paths[key] = save_adapter(source, tmp_path / f"{key}.safetensors")
    segmenter = new_segmenter(CONFIGS["A"])
    segmenter.add_adapter("depth", paths["A"])
    segmenter.add_adapter("sar", paths["B"])
    for name in ["sar", "depth", "default", "sar"]:
        segmenter.set_adapter(name)
        assert segmenter.adapter.preprocessing == {"depth": depth, "sar": sar, "default": None}[name], name
    segmenter.set_adapter("default")
    load_adapter(segmenter, paths["A"])
    assert segmenter.adapter.preprocessing == depth
    assert segmenter.get_adapter("sar").preprocessing == sar
