"""One grouping prompter (CUP + ACP + up-projection) and the auxiliary patch embedding."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import GoptConfig
from .grouping import GroupingModule
from .tokens import patch_rows, rescale_patch_tokens_linear


@dataclass
class PromptState:
    """What one prompter hands to the next within a forward pass (eq. 15).

    ``aux_tokens`` is the aux embedding's ``f_m^0`` ``[B, S, r]``, which every prompter's CUP
    groups anew; ``class_tokens`` is ``c_m`` ``[B, C, r]``, the previous prompter's group prompts.
    """

    aux_tokens: torch.Tensor
    class_tokens: torch.Tensor


def recomputed(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """``fn(*inputs)``, keeping only ``inputs`` for backward, where ``fn`` runs again.

    For the prompter's width-``D`` steps (LayerNorm + down-projection, up-projection +
    rescaling): their intermediates are ``[B, S, D]`` per block, as large as a block's own
    activations, while recomputing them costs a few ``S x D x r`` products.
    """
    if torch.is_grad_enabled():
        return checkpoint(fn, *inputs, use_reentrant=False)
    return fn(*inputs)


def scene_normalized(tokens: torch.Tensor) -> torch.Tensor:
    """``[B, N, r]`` tokens relative to their sample: each feature centred over the ``N`` tokens,
    then divided by the RMS of the sample's ``N x r`` values (float32 statistics, nothing learned).

    One shift and one scale per sample, so the differences between tokens survive: the result
    does not change with a per-sample gain (> 0) and offset of a linear embedding's input, the
    way a depth or thermal image's meaning is relative to its scene. A per-token LayerNorm
    would map every token ``a * s`` to ``sign(a) * LN(s)``, and a flat aux patch of level ``a``
    embeds to just that (docs/method.md, reading 2). The floor under the RMS keeps a flat
    image's tokens at zero instead of blowing float rounding up to unit scale.
    """
    values = tokens.float()
    centred = values - values.mean(dim=1, keepdim=True)  # [B, N, r]
    scale = torch.rsqrt(centred.pow(2).mean(dim=(1, 2), keepdim=True) + 1e-6)  # [B, 1, 1]
    return (centred * scale).to(tokens.dtype)


class SceneNorm(nn.Module):
    """:func:`scene_normalized`, then a learned per-feature gain and bias (a LayerNorm's
    parameters, under its state-dict names): ``[B, N, r] -> [B, N, r]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return scene_normalized(tokens) * self.weight + self.bias


def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """One-head ``softmax(q k^T / sqrt(r)) v`` on ``[B, N, r]`` tokens, with no projections.

    Fused ``scaled_dot_product_attention`` on a head axis of one: as fast as the 3-D call
    (benchmarks/prompter_cost.py), and the ONNX exporter translates only 4-D inputs.
    """
    return F.scaled_dot_product_attention(query[:, None], key[:, None], value[:, None])[:, 0]  # [B, N, r]


class AuxPatchEmbed(nn.Module):
    """Embeds the auxiliary image straight to width ``r`` on the backbone's token grid, relative to its scene.

    Kernel = stride = the backbone's token stride (``BackboneSpec.patch_size``: the patch size
    of a plain ViT, the CNN stem's total stride times the projection's patch size for a hybrid),
    with the same bottom/right padding rule, so token ``i`` of both streams covers the same
    pixels; a full-width embedding, or a copy of a hybrid's stem, would break the budget.

    With ``norm`` the tokens pass a :class:`SceneNorm`: a patch's level counts relative to the
    rest of its image, and tokens differ enough from each other for CUP's grouping to use its
    groups (docs/method.md, reading 2).
    """

    def __init__(self, in_chans: int, dim: int, patch_size: tuple[int, int], pad: bool, norm: bool = True) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.pad = pad
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.norm = SceneNorm(dim) if norm else nn.Identity()

    def forward(self, aux: torch.Tensor) -> torch.Tensor:
        if self.pad:  # bottom/right zero padding, as timm's PatchEmbed(dynamic_img_pad=True)
            ph, pw = self.patch_size
            aux = F.pad(aux, (0, (pw - aux.shape[-1] % pw) % pw, 0, (ph - aux.shape[-2] % ph) % ph))
        tokens = self.proj(aux).flatten(2).transpose(1, 2)  # [B, r, h, w] -> [B, S, r]
        return self.norm(tokens)


class ClassAwareUniModalPrompter(nn.Module):
    """CUP, eq. 4-10: self-attention over aux and class tokens, then grouping into prompts.

    Eq. 6 has no projections; we add a pre-LayerNorm and a residual (documented in
    docs/method.md) so that repeated prompters keep the aux tokens well scaled.
    """

    def __init__(self, dim: int, assignment: str, tau: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.grouping = GroupingModule(dim, assignment, tau)

    def forward(self, aux_tokens: torch.Tensor, class_tokens: torch.Tensor):
        num_tokens = aux_tokens.shape[1]
        z = torch.cat([aux_tokens, class_tokens], dim=1)  # eq. 5, [B, S + C, r]
        zn = self.norm(z)
        z = z + attention(zn, zn, zn)  # eq. 4, 6 (scale 1/sqrt(r))
        aux_hat, class_hat = z[:, :num_tokens], z[:, num_tokens:]  # [B, S, r], [B, C, r]
        prompts, assign = self.grouping.merge(aux_hat, class_hat)  # eq. 7-10, [B, C, r]
        return aux_hat, prompts, assign


class AlignmentCrossModalPrompter(nn.Module):
    """ACP, eq. 11-14: patch tokens attend to the group prompts, then each takes its group's prompt.

    With ``aligned`` the query of patch ``i`` is its RGB token plus the aux token aligned with
    it (the alignment the prompter is named after); otherwise the RGB token alone (eq. 12 as
    printed), which leaves every patch blind to its own aux value: two patches that look the
    same in RGB then receive the same prompt, whatever their depth or temperature.
    """

    def __init__(self, embed_dim: int, dim: int, assignment: str, tau: float, aligned: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.down = nn.Linear(embed_dim, dim)
        self.grouping = GroupingModule(dim, assignment, tau)
        self.aligned = aligned

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(tokens))  # [B, P + S, D] -> [B, P + S, r]

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int, prompts: torch.Tensor,
                aux_tokens: torch.Tensor) -> torch.Tensor:
        """Block input ``tokens``, group prompts ``[B, C, r]`` and the aux tokens ``[B, S, r]``
        aligned with the patches -> one prompt per patch token ``[B, S, r]``."""
        query = patch_rows(recomputed(self.project, tokens), num_prefix_tokens)  # [B, S, r]
        if self.aligned:
            query = query + aux_tokens  # patch i and the aux token covering the same pixels
        attended = attention(query, prompts, prompts)  # eq. 12, 14, [B, S, r]
        return self.grouping.dispatch(attended, prompts)  # eq. 11, [B, S, r]


class GroupingPrompter(nn.Module):
    """The prompter placed before one frozen block: it rescales the block's patch tokens.

    With CUP, the group prompts ``P_m`` (eq. 15's next class tokens) and the attended aux tokens
    ``f_hat`` ACP reads are :func:`scene_normalized`, so every prompter receives tokens at the
    scale the first one does (unnormalised, both grew by about ``sqrt(r)`` per prompter, ACP's
    attention turned one-hot and the grouping collapsed: docs/method.md, reading 12). The next
    prompter's CUP reads the first aux tokens ``f_m^0`` again, not ``f_hat``: chained, CUP's
    attention-only layers smoothed the aux tokens into two clusters within a few prompters, and
    the grouping of every later prompter into two groups (reading 8).

    Ablations (paper Table 4): without CUP the group prompts are the incoming class tokens
    plus the mean aux token (no self-attention, no grouping), and the class tokens pass on
    unchanged (nothing was grouped, so eq. 15 has no new prompts to inherit; handing on the
    sum would add the mean aux token once more at every prompter); without ACP each RGB token
    takes the prompt of the group its own aux token was assigned to by CUP.
    """

    def __init__(self, config: GoptConfig, embed_dim: int) -> None:
        super().__init__()
        r = config.hidden_dim
        self.cup = ClassAwareUniModalPrompter(r, config.assignment, config.tau) if config.use_cup else None
        self.acp = AlignmentCrossModalPrompter(embed_dim, r, config.assignment, config.tau,
                                               aligned=config.acp_query == "aligned") if config.use_acp else None
        self.up = nn.Linear(r, embed_dim)

    def forward(self, tokens: torch.Tensor, num_prefix_tokens: int,
                state: PromptState) -> tuple[torch.Tensor, PromptState]:
        """A block input ``[B, P + S, D]`` (or SAM's ``[B, h, w, D]``) -> the same with its patch
        tokens rescaled (prefix tokens untouched), and the state for the next prompter."""
        if self.cup is not None:
            aux_hat, prompts, assign = self.cup(state.aux_tokens, state.class_tokens)
            aux_tokens, prompts = scene_normalized(aux_hat), scene_normalized(prompts)  # [B, S, r], [B, C, r]
            inherited = prompts  # eq. 15: c_m <- P_m
        else:
            aux_tokens = state.aux_tokens
            prompts = state.class_tokens + aux_tokens.mean(dim=1, keepdim=True)  # [B, C, r]
            inherited = state.class_tokens  # no grouping: c_m <- c_{m-1}, no drift
        if self.acp is not None:
            token_prompts = self.acp(tokens, num_prefix_tokens, prompts, aux_tokens)  # [B, S, r]
        else:
            token_prompts = assign @ prompts  # [B, S, C] @ [B, C, r] -> [B, S, r]
        prompted = recomputed(self.inject, tokens, token_prompts, num_prefix_tokens)
        return prompted, PromptState(state.aux_tokens, inherited)

    def inject(self, tokens: torch.Tensor, token_prompts: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """Eq. 3: patch tokens times ``1 + Up(t)`` (``Up`` starts at zero: identity at init)."""
        return rescale_patch_tokens_linear(tokens, num_prefix_tokens, token_prompts,  # [B, S, r] -> [B, P + S, D]
                                           self.up.weight, self.up.bias)
