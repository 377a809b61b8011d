"""Simulated failures of the auxiliary sensor, for measuring what an adapter does when they happen.

RGB-X systems run where depth cameras drop frames or leave holes, thermal cameras saturate,
and the two sensors drift out of alignment. :class:`AuxFault` is one such condition, applied
to a sample's already normalised aux image ``[C, H, W]``; :class:`FaultyAux` applies one to
every sample of a dataset, the same way on every pass (seeded by sample index), and
:class:`WithoutAux` runs a segmenter in its aux-missing mode under ``model(rgb, aux)`` calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

FAULT_KINDS = ("clean", "missing", "zeros", "mean", "noise", "holes", "shift")
HOLE_BLOCK = 4  # holes are dropped in HOLE_BLOCK x HOLE_BLOCK pixel squares, like depth dropouts


@dataclass(frozen=True)
class AuxFault:
    """One aux condition at inference.

    ``kind``:

    - ``clean``: the aux image as recorded;
    - ``missing``: no aux image; the segmenter runs its aux-missing mode (see :class:`WithoutAux`);
    - ``zeros``: every value 0 after normalisation (a sensor that is on but sends nothing);
    - ``mean``: every value the image's own mean, per channel (a flat, uninformative frame);
    - ``noise``: plus Gaussian noise of standard deviation ``level`` (normalised units);
    - ``holes``: ``HOLE_BLOCK``-pixel squares, each with probability ``level``, set to the image's
      minimum (depth holes, saturated or dead pixels);
    - ``shift``: the aux image moved ``level`` pixels right and down, edges repeated
      (misregistered sensors).
    """

    kind: str
    level: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise ValueError(f"unknown aux fault {self.kind!r}; valid: {FAULT_KINDS}")
        if isinstance(self.level, bool) or not isinstance(self.level, (int, float)) or not math.isfinite(self.level):
            raise ValueError(f"aux fault level must be a finite number, got {self.level!r}")
        needs_level = self.kind in ("noise", "holes", "shift")
        if not needs_level and self.level != 0:
            raise ValueError(f"aux fault {self.kind!r} takes no level, got {self.level}")
        if self.kind == "noise" and not self.level > 0:
            raise ValueError(f"noise needs a standard deviation > 0, got {self.level}")
        if self.kind == "holes" and not 0 < self.level <= 1:
            raise ValueError(f"holes needs a rate in (0, 1], got {self.level}")
        if self.kind == "shift" and (self.level != int(self.level) or self.level < 1):
            raise ValueError(f"shift needs a whole number of pixels >= 1, got {self.level}")

    @property
    def name(self) -> str:
        """A table label: ``noise 0.3``, ``holes 11%``, ``shift 2 px``, ``clean``."""
        if self.kind == "noise":
            return f"noise {self.level:g}"
        if self.kind == "holes":
            return f"holes {100 * self.level:g}%"
        if self.kind == "shift":
            return f"shift {int(self.level)} px"
        return self.kind

    def apply(self, aux: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The faulty version of a normalised aux image ``[C, H, W]`` (``missing``: unchanged)."""
        if aux.ndim != 3:
            raise ValueError(f"expected one aux image [C, H, W], got {tuple(aux.shape)}")
        if self.kind in ("clean", "missing"):
            return aux
        if self.kind == "zeros":
            return torch.zeros_like(aux)
        if self.kind == "mean":
            return aux.mean(dim=(1, 2), keepdim=True).expand_as(aux).clone()
        if self.kind == "noise":
            noise = torch.randn(aux.shape, generator=generator, dtype=aux.dtype, device=aux.device)
            return aux + self.level * noise
        if self.kind == "holes":
            (_, h, w), b = aux.shape, HOLE_BLOCK
            blocks = torch.rand((-(-h // b), -(-w // b)), generator=generator, device=aux.device) < self.level
            mask = blocks.repeat_interleave(b, 0).repeat_interleave(b, 1)[:h, :w]  # [H, W]
            return aux.masked_fill(mask, aux.min().item())
        k = int(self.level)  # shift: pixel (y, x) takes the value recorded at (y - k, x - k)
        padded = F.pad(aux[None], (k, 0, k, 0), mode="replicate")[0]  # [C, H + k, W + k]
        return padded[:, : aux.shape[1], : aux.shape[2]].contiguous()


# The conditions benchmarks.robustness reports, in its column order.
ROBUSTNESS_FAULTS = (
    AuxFault("clean"), AuxFault("missing"), AuxFault("zeros"), AuxFault("mean"),
    AuxFault("noise", 0.1), AuxFault("noise", 0.3), AuxFault("noise", 1.0),
    AuxFault("holes", 0.05), AuxFault("holes", 0.11), AuxFault("holes", 0.25),
    AuxFault("shift", 1), AuxFault("shift", 2), AuxFault("shift", 4),
)


class FaultyAux(Dataset):
    """``dataset`` with ``fault`` applied to every sample's ``aux``; sample ``i`` is always
    corrupted the same way (its own generator, seeded by ``seed`` and ``i``)."""

    def __init__(self, dataset: Dataset, fault: AuxFault, seed: int = 0) -> None:
        self.dataset, self.fault, self.seed = dataset, fault, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = dict(self.dataset[index])
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        sample["aux"] = self.fault.apply(sample["aux"], generator)
        return sample


class WithoutAux(nn.Module):
    """``model(rgb, aux)`` that ignores ``aux`` and runs ``segmenter(rgb, aux=None)``: the
    aux-missing mode, behind the call every evaluation loop makes."""

    def __init__(self, segmenter: nn.Module) -> None:
        super().__init__()
        self.segmenter = segmenter

    def forward(self, rgb: torch.Tensor, aux: torch.Tensor | None = None) -> torch.Tensor:
        return self.segmenter(rgb, None)


__all__ = ["AuxFault", "FAULT_KINDS", "FaultyAux", "ROBUSTNESS_FAULTS", "WithoutAux"]
