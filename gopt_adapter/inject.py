"""Puts GoPT into a timm model's block stack, and takes it out again.

Each block of ``model.blocks`` is replaced by a :class:`PromptedBlock` that holds the
original block. During a segmenter forward, a :class:`PromptContext` tells the wrappers which
adapter is active and carries the prompter state from block to block; outside such a forward
the wrappers are transparent, so the wrapped model still computes the frozen RGB model.
Several adapters can share one forward, each on its own samples of the batch (a route each).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .contract import SegmentationAdapter


@dataclass
class Route:
    """One adapter's share of a forward: its samples (``None``: the whole batch) and the
    prompter state it carries from block to block, for those samples only."""

    adapter: SegmentationAdapter
    samples: torch.Tensor | None  # int64 [n] batch indices
    state: Any  # what the adapter hands from block to block (GoPT: a PromptState)


class PromptContext:
    """Per-forward state shared by the wrapped blocks of one segmenter (not a module).

    A plain forward has one route over the whole batch; a mixed-task batch
    (:meth:`~gopt_adapter.gopt_segmenter.GoptSegmenter.forward_mixed`) one route per adapter, over its own samples.
    """

    def __init__(self) -> None:
        self.routes: list[Route] = []

    @contextmanager
    def active(self, routes: list[Route]) -> Iterator[None]:
        self.routes = routes
        try:
            yield
        finally:
            self.routes = []

    def apply(self, block_index: int, x: torch.Tensor) -> torch.Tensor:
        """A block input ``[B, ...]`` with every route's prompts written into its samples.

        An adapter's ``prompt`` returns its input itself where it has no prompter before this
        block (other intervals): those samples stay as they are; the other routes' prompted
        rows go back in one out-of-place copy.
        """
        written: list[tuple[torch.Tensor, torch.Tensor]] = []
        for route in self.routes:
            if route.samples is None:
                x, route.state = route.adapter.prompt(block_index, x, route.state)
                continue
            if not route.adapter.prompts_at(block_index):  # no prompter here: no gather of its rows
                continue
            rows = x[route.samples]  # [n, ...]
            prompted, route.state = route.adapter.prompt(block_index, rows, route.state)
            if prompted is not rows:
                written.append((route.samples, prompted))
        if written:
            samples, rows = zip(*written)
            x = x.index_copy(0, torch.cat(samples), torch.cat(rows))
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
