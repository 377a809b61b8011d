"""Finiteness checks for tensors: which of them hold a NaN or an inf, found in one device sync.

Shared by the trainer (a step whose loss or gradients are not finite is skipped) and by every
writer of trained tensors (adapter files, ``trained.safetensors``): a diverged run must not
leave a file that loads without complaint and predicts garbage.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch

from .errors import NonFiniteTensorError

SHOWN_NAMES = 5  # tensor names quoted in a one-line message


def finite_flags(tensors: Sequence[torch.Tensor]) -> list[bool]:
    """Whether each tensor is free of NaN and inf (empty and integer tensors are), with one
    device sync for all of them: a fused max-abs per tensor, NaN where a NaN is."""
    checked = [index for index, tensor in enumerate(tensors) if tensor.is_floating_point() and tensor.numel()]
    flags = [True] * len(tensors)
    if not checked:
        return flags
    peaks = torch._foreach_norm([tensors[i].detach() for i in checked], math.inf)  # max |x|, one per tensor
    device = peaks[0].device
    finite = torch.stack([peak.float().to(device) for peak in peaks]).isfinite().tolist()  # [len(checked)]
    for index, ok in zip(checked, finite):
        flags[index] = ok
    return flags


def nonfinite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """The names of the tensors holding a NaN or an inf, in the mapping's order."""
    return [name for name, ok in zip(tensors, finite_flags(list(tensors.values()))) if not ok]


def shown(names: Sequence[str], limit: int = SHOWN_NAMES) -> str:
    """``names`` for a one-line message: the first ``limit``, then how many more."""
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def check_finite(tensors: Mapping[str, torch.Tensor],
                 error: Callable[[str], Exception] = NonFiniteTensorError) -> None:
    """Raises ``error`` naming the tensors that hold NaN or inf values, if any: called before
    a file is written, so that nothing is (the file at the path, if any, stays as it was)."""
    bad = nonfinite_names(tensors)
    if bad:
        raise error(f"refusing to write {len(bad)} of {len(tensors)} tensors holding NaN or inf values "
                    f"({shown(bad)}); nothing was written")
