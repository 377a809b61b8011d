"""The token layout of a timm block input, and the two ways an adapter writes into it.

Block inputs are ``[B, P + S, D]`` sequences with the ``P`` prefix tokens (class,
distillation, register tokens) first, or SAM's ``[B, h, w, D]`` maps with no prefix. Adapters
change only the ``S`` patch tokens, and do it in one pass over the whole contiguous input:
slicing the patch tokens out and concatenating the prefix back would copy ``[B, S, D]`` twice
per block, forward and backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def patch_rows(tokens: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The patch-token rows ``[B, S, C]`` of a per-token tensor shaped like a block input.

    Block inputs are ``[B, P + S, D]`` (prefix tokens first) or SAM's ``[B, h, w, D]`` maps
    (no prefix); ``tokens`` may have any last width.
    """
    return tokens.flatten(1, -2)[:, num_prefix_tokens:]


def _patch_delta(x: torch.Tensor, num_prefix_tokens: int, delta: torch.Tensor) -> torch.Tensor:
    """``delta [B, S, D]`` laid out like ``x``, zero on the prefix tokens."""
    if x.ndim == 4:  # SAM-style [B, h, w, D] token map, no prefix tokens
        return delta.reshape(x.shape)
    return F.pad(delta, (0, 0, num_prefix_tokens, 0)) if num_prefix_tokens else delta


def rescale_patch_tokens(x: torch.Tensor, num_prefix_tokens: int, delta: torch.Tensor) -> torch.Tensor:
    """Eq. 3: patch tokens times ``1 + delta [B, S, D]``, prefix tokens unchanged."""
    return torch.addcmul(x, x, _patch_delta(x, num_prefix_tokens, delta))


def rescale_patch_tokens_linear(x: torch.Tensor, num_prefix_tokens: int, prompts: torch.Tensor,
                                weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Eq. 3 with ``delta = prompts @ weight.T + bias``: :func:`rescale_patch_tokens` of a linear
    layer's output, without padding that ``[B, P + S, D]`` output.

    The prompts ``[B, S, r]`` get ``P`` zero rows and, for the bias, a column of ones; one GEMM
    then writes ``delta`` already laid out like ``x``, exactly zero on the prefix rows. Padding
    the ``[B, S, D]`` output instead costs a fill and a copy of it per block, the largest
    avoidable memory traffic of a prompter (docs/performance.md, "What profiling changed").
    """
    if x.ndim == 4 or not num_prefix_tokens:
        return rescale_patch_tokens(x, num_prefix_tokens, F.linear(prompts, weight, bias))
    if bias is not None:
        prompts, weight = F.pad(prompts, (0, 1), value=1.0), torch.cat([weight, bias[:, None]], dim=1)
    rows = F.pad(prompts, (0, 0, num_prefix_tokens, 0))  # [B, P + S, r (+ 1)]
    return torch.addcmul(x, x, rows @ weight.t())  # [B, P + S, D]


def add_to_patch_tokens(x: torch.Tensor, num_prefix_tokens: int, delta: torch.Tensor) -> torch.Tensor:
    """Patch tokens plus ``delta [B, S, D]``, prefix tokens unchanged."""
    return x + _patch_delta(x, num_prefix_tokens, delta)
