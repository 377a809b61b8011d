"""Puts GoPT into a timm model's block stack, and takes it out again.

Each block of ``model.blocks`` is replaced by a :class:`PromptedBlock` that holds the
original block. During a segmenter forward, a :class:`PromptContext` tells the wrappers which
adapter is active and carries the prompter state from block to block; outside such a forward
the wrappers are transparent, so the wrapped model still computes the frozen RGB model.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .prompter import PromptState

if TYPE_CHECKING:
    from .adapter import GoptAdapter


class PromptContext:
    """Per-forward state shared by the wrapped blocks of one segmenter (not a module)."""

    def __init__(self) -> None:
        self.adapter: GoptAdapter | None = None
        self.state: PromptState | None = None

    @contextmanager
    def active(self, adapter: "GoptAdapter", state: PromptState) -> Iterator[None]:
        self.adapter, self.state = adapter, state
        try:
            yield
        finally:
            self.adapter, self.state = None, None

    def apply(self, block_index: int, x: torch.Tensor) -> torch.Tensor:
        if self.adapter is None:
            return x
        x, self.state = self.adapter.prompt(block_index, x, self.state)
        return x


class PromptedBlock(nn.Module):
    """A frozen timm block preceded by the active adapter's prompter for this depth.

    Extra positional and keyword arguments (Eva's ``rope``, Beit's ``shared_rel_pos_bias``)
    pass through untouched. With ``checkpoint`` set, only the frozen block is recomputed in
    backward; the prompter runs once, so its carried state is never replayed out of order.
    """

    def __init__(self, block: nn.Module, index: int, context: PromptContext) -> None:
        super().__init__()
        self.block = block
        self.index = index
        self.context = context
        self.checkpoint = False

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        x = self.context.apply(self.index, x)
        if self.checkpoint and torch.is_grad_enabled():
            return checkpoint(self.block, x, *args, use_reentrant=False, **kwargs)
        return self.block(x, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}"


def is_wrapped(model: nn.Module) -> bool:
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, (nn.Sequential, nn.ModuleList)) and any(isinstance(b, PromptedBlock) for b in blocks)


def wrap_blocks(model: nn.Module, context: PromptContext) -> None:
    for index, block in enumerate(model.blocks):
        model.blocks[index] = PromptedBlock(block, index, context)


def unwrap_blocks(model: nn.Module) -> None:
    for index, block in enumerate(model.blocks):
        if isinstance(block, PromptedBlock):
            model.blocks[index] = block.block
