"""One task's trainable part: aux embedding, class tokens, prompters and head."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import BackboneSpec
from .config import GoptConfig
from .heads import build_head
from .preprocessing import Preprocessing
from .prompter import AuxPatchEmbed, GroupingPrompter, PromptState


@torch.no_grad()
def xavier_init_(module: nn.Module) -> None:
    """GoPT's initialisation (paper, Experimental Setup): Xavier-uniform weights, zero biases,
    fresh norms, for every linear and conv layer inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.LayerNorm, nn.BatchNorm2d)):
            layer.reset_parameters()


class GoptAdapter(nn.Module):
    """All weights a task adds to a frozen backbone; saved and swapped as one unit.

    ``prompters[k]`` sits before block ``block_indices[k]``. ``preprocessing`` (optional) records
    how raw image files were scaled and normalised for training; it is saved with the adapter.
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
        self.preprocessing = None
        self.reset_parameters()

    @property
    def preprocessing(self) -> Preprocessing | None:
        """How inputs were prepared in training (``None``: not recorded)."""
        return self._preprocessing

    @preprocessing.setter
    def preprocessing(self, value: Preprocessing | None) -> None:
        if value is not None and not isinstance(value, Preprocessing):
            raise TypeError(f"preprocessing must be a Preprocessing or None, got {type(value).__name__}")
        self._preprocessing = value

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform for prompter weights (paper), zero up-projection (identity at init)."""
        xavier_init_(self)
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
        return self.prompters[slot](x, self.spec.prefix_tokens(block_index), state)

    def extra_repr(self) -> str:
        return f"blocks={list(self.block_indices)}"
