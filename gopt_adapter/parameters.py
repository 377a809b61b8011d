"""Parameter accounting."""

from __future__ import annotations

from typing import NamedTuple

from torch import nn


class ParameterCount(NamedTuple):
    trainable: int
    total: int


def count_parameters(module: nn.Module) -> ParameterCount:
    """Trainable (``requires_grad``) and total parameter counts; shared tensors counted once."""
    params = list(module.parameters())
    return ParameterCount(sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params))
