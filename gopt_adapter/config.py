"""Typed, validated configuration of one GoPT adapter (one task)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Mapping

ASSIGNMENTS = ("hard", "soft")
ACP_QUERIES = ("aligned", "rgb")
HEADS = ("setr_naive", "linear")


@dataclass(frozen=True)
class GoptConfig:
    """Everything that defines a GoPT adapter apart from the backbone it sits on.

    Attributes:
        aux_channels: channels of the auxiliary image (1 for depth/thermal/SAR, 3 for HHA).
        num_classes: segmentation classes predicted by the head.
        interval: a grouping prompter sits before blocks ``0, interval, 2*interval, ...``;
            ``interval == depth`` is GoPT-Shallow (one prompter before block 0).
        hidden_dim: width ``r`` at which the prompters work (the paper gives none; 32 keeps
            ViT-B with 40 classes inside the paper's 0.97M budget).
        num_groups: number of class tokens ``C``; ``None`` means ``num_classes`` (paper).
        assignment: ``"hard"`` Gumbel-softmax one-hot with straight-through gradient
            (eq. 9) or ``"soft"`` (the Fig. 7 ablation).
        tau: Gumbel-softmax temperature.
        use_cup: keep the class-aware uni-modal prompter (Table 4 ablation switch).
        use_acp: keep the alignment-induced cross-modal prompter (Table 4 ablation switch).
        acp_query: what ACP's query for patch ``i`` is made of (eq. 12): ``"aligned"`` adds the
            aux token aligned with patch ``i`` to its RGB token (our reading, docs/method.md);
            ``"rgb"`` is the RGB token alone, eq. 12 as printed, with which no aux detail
            finer than the ``C`` image-wide group prompts reaches a patch.
        head: ``"setr_naive"`` (1x1 conv, BN, ReLU, 1x1 conv) or ``"linear"`` (BN, 1x1 conv).
        head_channels: hidden channels of the SETR-naive head.
        aux_dropout: probability that a training sample's aux image is treated as missing
            (the adapter's aux-missing mode, see :meth:`GoptAdapter.initial_state`). ``0``
            is the paper's training and gives an adapter without a missing mode; ``> 0``
            adds stand-ins for absent aux tokens (a learned token of width ``r`` plus a learned
            embedding of the RGB patches) and per-class logit offsets fitted after training
            (:func:`~gopt_adapter.calibration.calibrate_missing_mode`), so
            ``segmenter(rgb, aux=None)`` works (docs/method.md, "When the aux image is missing").
    """

    aux_channels: int
    num_classes: int
    interval: int = 1
    hidden_dim: int = 32
    num_groups: int | None = None
    assignment: str = "hard"
    tau: float = 1.0
    use_cup: bool = True
    use_acp: bool = True
    acp_query: str = "aligned"
    head: str = "setr_naive"
    head_channels: int = 256
    aux_dropout: float = 0.0

    def __post_init__(self) -> None:
        for name in ("aux_channels", "num_classes", "interval", "hidden_dim", "head_channels"):
            check_positive_int(name, getattr(self, name))
        if self.num_groups is not None:
            check_positive_int("num_groups", self.num_groups)
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment must be one of {ASSIGNMENTS}, got {self.assignment!r}")
        if self.acp_query not in ACP_QUERIES:
            raise ValueError(f"acp_query must be one of {ACP_QUERIES}, got {self.acp_query!r}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if isinstance(self.tau, bool) or not isinstance(self.tau, (int, float)):
            raise ValueError(f"tau must be a positive float, got {self.tau!r}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise ValueError(f"tau must be finite and > 0 (Gumbel-softmax temperature), got {self.tau}")
        if (isinstance(self.aux_dropout, bool) or not isinstance(self.aux_dropout, (int, float))
                or not 0 <= self.aux_dropout < 1):
            raise ValueError(f"aux_dropout must be a probability in [0, 1), got {self.aux_dropout!r}")
        for name in ("use_cup", "use_acp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not (self.use_cup or self.use_acp):
            raise ValueError(
                "use_cup and use_acp cannot both be False: without CUP there are no groups to "
                "dispatch and without ACP no way to reach the RGB tokens; one must remain"
            )

    @property
    def has_missing_mode(self) -> bool:
        """Whether adapters of this config carry the learned missing-aux token."""
        return self.aux_dropout > 0

    @property
    def groups(self) -> int:
        """Number of class tokens ``C`` actually used."""
        return self.num_classes if self.num_groups is None else self.num_groups

    def prompter_blocks(self, depth: int) -> tuple[int, ...]:
        """Indices of the blocks that receive a prompter on a backbone of ``depth`` blocks."""
        if self.interval > depth:
            raise ValueError(
                f"interval={self.interval} exceeds the backbone depth {depth}; "
                f"use 1..{depth} ({depth} is GoPT-Shallow)"
            )
        return tuple(range(0, depth, self.interval))

    def replace(self, **changes: Any) -> "GoptConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "GoptConfig":
        """Builds a config from ``to_dict`` output; unknown keys are an error, not ignored."""
        return cls(**_checked_options(dict(data)))

    @classmethod
    def from_options(cls, aux_channels: int, num_classes: int, interval: int = 1, **options: Any) -> "GoptConfig":
        """The constructor behind ``apply_gopt(model, aux_channels, num_classes, interval, **options)``."""
        return cls(aux_channels=aux_channels, num_classes=num_classes, interval=interval,
                   **_checked_options(options))


def _checked_options(options: dict[str, Any]) -> dict[str, Any]:
    known = {f.name for f in dataclasses.fields(GoptConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown GoPT option(s) {unknown}; valid options: {sorted(known)}")
    return options


def check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
