"""The adapter contract: what a segmenter and its prompted blocks call on an adapter.

A segmenter (:class:`~gopt_adapter.segmenter.SegmenterBase`) runs one frozen timm ViT
with the prompts of an adapter. Per forward it calls, in this order:

1. ``state = adapter.initial_state(aux)`` once (``aux [B, C_aux, H, W]``);
2. before every block ``l`` (:class:`~gopt_adapter.inject.PromptedBlock`), ``x, state =
   adapter.prompt(l, x, state)`` on the block's input tokens ``x [B, P + S, D]``; in a mixed
   batch, only where ``adapter.prompts_at(l)`` is true (elsewhere ``prompt`` must return its
   ``x`` itself);
3. ``adapter.head(features)`` on the final features ``[B, D, h, w]`` -> logits ``[B, K, h, w]``.

It reads ``adapter.config.aux_channels`` (input checks) and ``adapter.config.num_classes``.
An adapter with an aux-missing mode also has a non-``None`` ``missing_aux`` and takes
``initial_state(aux, missing, rgb)`` with a bool ``[B]`` mask and the RGB image, from which
it makes the missing samples' stand-in state. :class:`~gopt_adapter.adapter.GoptAdapter`
and the baselines' adapters (:mod:`gopt_adapter.baselines`) implement the contract; the
state is whatever the adapter hands from block to block (GoPT: a
:class:`~gopt_adapter.prompter.PromptState`).
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["AdapterConfig", "SegmentationAdapter", "check_adapter"]


@runtime_checkable
class AdapterConfig(Protocol):
    """What a segmenter reads from an adapter's config."""

    aux_channels: int
    num_classes: int


@runtime_checkable
class SegmentationAdapter(Protocol):
    """What :class:`~gopt_adapter.inject.PromptedBlock` and the segmenters call on an adapter."""

    config: AdapterConfig
    head: nn.Module  # features [B, D, h, w] -> logits [B, K, h, w]

    def initial_state(self, aux: torch.Tensor) -> Any:
        """The state entering block 0, from ``aux [B, C_aux, H, W]``."""
        ...

    def prompts_at(self, block_index: int) -> bool:
        """Whether :meth:`prompt` changes the tokens entering block ``block_index``."""
        ...

    def prompt(self, block_index: int, x: torch.Tensor, state: Any) -> tuple[torch.Tensor, Any]:
        """The tokens ``x [B, P + S, D]`` entering block ``block_index``, prompted, and the next state."""
        ...


def _members(protocol: type) -> list[str]:
    """The names a protocol declares: its annotated attributes and its methods."""
    methods = [name for name, value in vars(protocol).items() if callable(value) and not name.startswith("_")]
    return [*protocol.__annotations__, *methods]


def check_adapter(adapter: Any) -> None:
    """Raises ``TypeError`` naming what is missing unless ``adapter`` is an ``nn.Module``
    implementing :class:`SegmentationAdapter` whose config is an :class:`AdapterConfig`."""
    if not isinstance(adapter, nn.Module):
        problem = "not an nn.Module"
    elif not isinstance(adapter, SegmentationAdapter):
        problem = "it has no " + ", ".join(name for name in _members(SegmentationAdapter) if not hasattr(adapter, name))
    elif not isinstance(adapter.config, AdapterConfig):
        problem = "its config has no " + ", ".join(
            name for name in _members(AdapterConfig) if not hasattr(adapter.config, name))
    else:
        return
    raise TypeError(f"a segmenter's adapter must be an nn.Module implementing "
                    f"gopt_adapter.contract.SegmentationAdapter; a {type(adapter).__name__} is not ({problem})")
