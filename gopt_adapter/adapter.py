"""One task's trainable part: aux embedding, class tokens, prompters and head."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import BackboneSpec
from .config import GoptConfig
from .heads import build_head
from .prompter import AuxPatchEmbed, GroupingPrompter, PromptState


class GoptAdapter(nn.Module):
    """All weights a task adds to a frozen backbone; saved and swapped as one unit.

    ``prompters[k]`` sits before block ``block_indices[k]``.
    """

    def __init__(self, config: GoptConfig, spec: BackboneSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.block_indices = config.prompter_blocks(spec.depth)
        self._slot = {block: slot for slot, block in enumerate(self.block_indices)}
        r = config.hidden_dim
        self.aux_embed = AuxPatchEmbed(config.aux_channels, r, spec.patch_size, spec.dynamic_img_pad)
        self.class_tokens = nn.Parameter(torch.empty(config.groups, r))  # c_m^0, [C, r]
        self.prompters = nn.ModuleList(GroupingPrompter(config, spec.embed_dim) for _ in self.block_indices)
        self.head = build_head(config.head, spec.num_features, config.num_classes, config.head_channels)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform for prompter weights (paper), zero up-projection (identity at init)."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)):
                module.reset_parameters()
        nn.init.xavier_uniform_(self.class_tokens)
        for prompter in self.prompters:
            nn.init.zeros_(prompter.up.weight)
            nn.init.zeros_(prompter.up.bias)

    def initial_state(self, aux: torch.Tensor) -> PromptState:
        """State entering the first prompter: aux tokens and the learned class tokens."""
        aux_tokens = self.aux_embed(aux)  # [B, S, r]
        class_tokens = self.class_tokens.unsqueeze(0).expand(aux.shape[0], -1, -1)  # [B, C, r]
        return PromptState(aux_tokens, class_tokens)

    def prompt(self, block_index: int, x: torch.Tensor, state: PromptState) -> tuple[torch.Tensor, PromptState]:
        """Applies the prompter of ``block_index`` (if any) to a block's input tokens."""
        slot = self._slot.get(block_index)
        if slot is None:
            return x, state
        prompter = self.prompters[slot]
        if x.ndim == 4:  # SAM-style [B, h, w, D] token map
            batch, height, width, dim = x.shape
            patches, state = prompter(x.reshape(batch, height * width, dim), state)
            return patches.reshape(batch, height, width, dim), state
        prefix_len = self.spec.num_prefix_tokens
        patches, state = prompter(x[:, prefix_len:], state)  # prefix tokens stay untouched
        if prefix_len:
            patches = torch.cat([x[:, :prefix_len], patches], dim=1)  # [B, P + S, D]
        return patches, state

    def extra_repr(self) -> str:
        return f"blocks={list(self.block_indices)}"
