"""Finiteness checks: exact per tensor in one pass, and trained tensors with NaN never written."""

import pytest
import torch
from safetensors.torch import load_file

from gopt_adapter.atomic_files import write_tensors
from gopt_adapter.errors import NonFiniteTensorError
from gopt_adapter.numerics import finite_flags, nonfinite_names, shown

NAN, INF = float("nan"), float("inf")


def test_finite_flags_is_exact_for_every_kind_of_tensor():
    tensors = [torch.tensor([1.0, NAN]), torch.tensor([-INF]), torch.tensor(3e38), torch.zeros(0),
               torch.ones(2, dtype=torch.bfloat16), torch.tensor([INF], dtype=torch.float16),
               torch.arange(3), torch.tensor(NAN)]
    assert finite_flags(tensors) == [False, False, True, True, True, False, True, False]
    assert finite_flags([]) == [] and finite_flags([torch.arange(2)]) == [True]


def test_nonfinite_names_keep_the_mapping_order_and_messages_shorten_them():
    tensors = {f"t{i}": torch.tensor([NAN if i % 2 else 1.0]) for i in range(16)}
    bad = nonfinite_names(tensors)
    assert bad == [f"t{i}" for i in range(1, 16, 2)]
    assert shown(bad) == "t1, t3, t5, t7, t9 and 3 more"


def test_write_tensors_refuses_nan_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "trained.safetensors"
    write_tensors(path, {"head.weight": torch.ones(2), "head.bias": torch.zeros(1)})
    original = path.read_bytes()
    with pytest.raises(NonFiniteTensorError, match=r"1 of 2 tensors holding NaN or inf values \(head.bias\)"):
        write_tensors(path, {"head.weight": torch.ones(2), "head.bias": torch.tensor([NAN])})
    with pytest.raises(NonFiniteTensorError):
        write_tensors(tmp_path / "other.safetensors", {"w": torch.tensor([INF])})
    assert path.read_bytes() == original and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert torch.equal(load_file(str(path))["head.weight"], torch.ones(2))
