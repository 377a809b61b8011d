"""The grouping module g(.) of GoPT (paper eq. 7-11), after GroupViT's grouping block."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Added to each group's token count in eq. 10's denominator, as GroupViT does (its
#: ``assign_eps``). Under hard assignment most groups are empty at a given step; with a tiny
#: epsilon the straight-through gradient reaching an empty group's assignment column is scaled
#: by 1/epsilon, which sent AdamW's second moments to infinity on real frames
#: (docs/method.md, "The merge denominator").
MERGE_COUNT_OFFSET = 1.0


def gumbel_noise_like(logits: torch.Tensor) -> torch.Tensor:
    """Gumbel(0, 1) samples ``-log(-log U)`` shaped like ``logits``, from torch's global generator.

    Uniform draws clamped away from 0 keep every sample finite; ``rand`` + two logs is about
    five times faster on the CPU than ``exponential_``.
    """
    uniform = torch.rand_like(logits).clamp_min_(torch.finfo(logits.dtype).tiny)
    return uniform.log_().neg_().log_().neg_()


def gumbel_assignment(logits: torch.Tensor, tau: float, hard: bool, noise: bool) -> torch.Tensor:
    """Assignment of each row of ``logits`` to one group, eq. 8-9.

    With ``noise`` (training), Gumbel(0, 1) samples drawn from torch's global generator are
    added, so the draw follows ``torch.manual_seed``; without it (evaluation) the result is
    deterministic. ``hard`` returns a one-hot of the argmax whose gradient is that of the
    softmax (straight-through, eq. 9); otherwise the softmax itself (soft assignment).

    Computed in float32 whatever the input dtype (bf16 under autocast has about 2,000 distinct
    uniform draws: a biased noise and tied logits); returned in the input dtype.
    """
    dtype, logits = logits.dtype, logits.float()
    if noise:
        logits = logits + gumbel_noise_like(logits)
    if hard and not (logits.requires_grad and torch.is_grad_enabled()):  # no gradient: the softmax is moot
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(dtype)
    soft = torch.softmax(logits / tau, dim=-1)  # eq. 8
    if not hard:
        return soft.to(dtype)
    one_hot = torch.zeros_like(soft).scatter_(-1, soft.argmax(dim=-1, keepdim=True), 1.0)
    return (one_hot - soft.detach() + soft).to(dtype)  # eq. 9, straight-through


class GroupingModule(nn.Module):
    """Assigns tokens to groups with learned query/key projections, then mixes values.

    ``merge`` pools the tokens of each group into its group token (eq. 10, CUP's ``g_m``);
    ``dispatch`` gives each token the value of its group (eq. 11, ACP's ``g_rgb,m``).
    """

    def __init__(self, dim: int, assignment: str = "hard", tau: float = 1.0) -> None:
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.hard = assignment == "hard"
        self.tau = tau
        self.scale = dim ** -0.5

    def assign(self, tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """``[B, N, r]`` tokens and ``[B, G, r]`` groups -> assignment ``[B, N, G]`` (rows sum to 1)."""
        logits = self.q(tokens) @ self.k(groups).transpose(1, 2) * self.scale  # [B, N, G]
        return gumbel_assignment(logits, self.tau, self.hard, noise=self.training)

    def merge(self, tokens: torch.Tensor, groups: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 10: ``p_j = c_j + Wo(sum_i A_ij Wv f_i / (sum_i A_ij + 1))``; returns ``(p, A)``.

        The ``+ 1`` (:data:`MERGE_COUNT_OFFSET`) keeps an empty group's prompt at ``c_j +
        Wo(0)`` with a bounded gradient; for a group of ``n`` tokens it shrinks the mean by
        ``n / (n + 1)``, which ``Wo`` absorbs.
        """
        assign = self.assign(tokens, groups)  # [B, S, C]
        pooled = assign.transpose(1, 2) @ self.v(tokens)  # [B, C, r]
        pooled = pooled / (assign.sum(dim=1).unsqueeze(-1) + MERGE_COUNT_OFFSET)
        return groups + self.o(pooled), assign

    def dispatch(self, tokens: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Eq. 11: ``t_i = p_i + Wo(sum_j A_ij Wv P_j)``, one prompt per token ``[B, S, r]``."""
        assign = self.assign(tokens, groups)  # [B, S, C]
        return tokens + self.o(assign @ self.v(groups))

    def extra_repr(self) -> str:
        return f"assignment={'hard' if self.hard else 'soft'}, tau={self.tau}"
