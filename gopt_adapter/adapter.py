"""One task's trainable part: aux embedding, class tokens, prompters and head."""

from __future__ import annotations

import torch
from torch import nn

from .backbone import BackboneSpec
from .config import GoptConfig
from .contract import SegmentationAdapter
from .heads import build_head
from .preprocessing import Preprocessing
from .prompter import AuxPatchEmbed, GroupingPrompter, PromptState, SceneNorm


@torch.no_grad()
def xavier_init_(module: nn.Module) -> None:
    """GoPT's initialisation (paper, Experimental Setup): Xavier-uniform weights, zero biases,
    fresh norms, for every linear and conv layer inside ``module``."""
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            nn.init.xavier_uniform_(layer.weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
        elif isinstance(layer, (nn.LayerNorm, nn.BatchNorm2d, SceneNorm)):
            layer.reset_parameters()


class GoptAdapter(nn.Module, SegmentationAdapter):
    """All weights a task adds to a frozen backbone; saved and swapped as one unit.

    ``prompters[k]`` sits before block ``block_indices[k]``. ``preprocessing`` (optional) records
    how raw image files were scaled and normalised for training, ``class_names`` (optional) the
    names of the classes it predicts; both are saved with the adapter.
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
        # the aux-missing mode (config.aux_dropout > 0 only): a sample without aux gets stand-in
        # aux tokens, one learned token plus a learned embedding of its RGB patches
        self.missing_aux = nn.Parameter(torch.empty(r)) if config.has_missing_mode else None  # [r]
        self.missing_embed = AuxPatchEmbed(spec.in_chans, r, spec.patch_size, spec.dynamic_img_pad) \
            if config.has_missing_mode else None
        # added to the logits of samples without aux; zero until fitted (gopt_adapter.calibration)
        self.register_buffer("missing_logit_bias", torch.zeros(config.num_classes) if config.has_missing_mode else None)
        self.prompters = nn.ModuleList(GroupingPrompter(config, spec.embed_dim) for _ in self.block_indices)
        self.head = build_head(config.head, spec.num_features, config.num_classes, config.head_channels)
        self.preprocessing = None
        self.class_names = None
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

    @property
    def class_names(self) -> tuple[str, ...] | None:
        """Names of the ``num_classes`` classes, index = class id (``None``: not recorded)."""
        return self._class_names

    @class_names.setter
    def class_names(self, value) -> None:
        if value is not None:
            value = tuple(value)
            if not all(isinstance(name, str) for name in value):
                raise TypeError(f"class_names must be strings, got {value!r}")
            if len(value) != self.config.num_classes:
                raise ValueError(f"{len(value)} class names for an adapter of {self.config.num_classes} classes")
        self._class_names = value

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform for prompter weights (paper), zero up-projection (identity at init)."""
        xavier_init_(self)
        nn.init.xavier_uniform_(self.class_tokens)
        if self.missing_aux is not None:
            nn.init.trunc_normal_(self.missing_aux, std=0.02)  # near the aux tokens' mean (0: they are centred)
        for prompter in self.prompters:
            nn.init.zeros_(prompter.up.weight)
            nn.init.zeros_(prompter.up.bias)

    def initial_state(self, aux: torch.Tensor, missing: torch.Tensor | None = None,
                      rgb: torch.Tensor | None = None) -> PromptState:
        """State entering the first prompter: aux tokens and the learned class tokens.

        ``missing`` (bool ``[B]``) marks samples without an aux image: their aux values are
        never read, and their aux tokens are stand-ins made from their ``rgb [B, 3, H, W]``
        (:meth:`stand_in_tokens`). In training, ``config.aux_dropout`` marks further samples
        at random, so that the prompters and the head learn to do without aux (with 0
        nothing is drawn).
        """
        if self.training and self.config.aux_dropout > 0:
            dropped = torch.rand(aux.shape[0], device=aux.device) < self.config.aux_dropout  # [B]
            missing = dropped if missing is None else missing | dropped
        if missing is None:
            aux_tokens = self.aux_embed(aux)  # [B, S, r]
        else:
            if self.missing_aux is None:
                raise ValueError("this adapter has no aux-missing mode: it was trained with aux_dropout=0")
            if rgb is None:
                raise ValueError("the aux-missing mode needs the rgb image: initial_state(aux, missing, rgb)")
            tokens = self.aux_embed(aux.masked_fill(missing.view(-1, 1, 1, 1), 0))  # absent aux (even NaN) unread
            aux_tokens = torch.where(missing.view(-1, 1, 1), self.stand_in_tokens(rgb).to(tokens.dtype),
                                     tokens)  # [B, S, r]
        class_tokens = self.class_tokens.unsqueeze(0).expand(aux.shape[0], -1, -1)  # [B, C, r]
        return PromptState(aux_tokens, class_tokens)

    def stand_in_tokens(self, rgb: torch.Tensor) -> torch.Tensor:
        """Aux tokens for samples without aux: ``missing_aux`` plus an embedding of the RGB
        patch each token covers, ``[B, S, r]``.

        The RGB term lets the stand-ins vary over the scene as real aux tokens do, so that CUP
        still forms groups and ACP still gives regions different prompts (docs/method.md).
        """
        return self.missing_embed(rgb) + self.missing_aux  # [B, S, r]

    def offset_missing_logits(self, logits: torch.Tensor, missing: torch.Tensor | None) -> torch.Tensor:
        """``logits [B, K, h, w]`` with ``missing_logit_bias`` added to the samples flagged in
        ``missing`` (bool ``[B]``; ``None``: no sample was flagged, nothing changes)."""
        if missing is None or self.missing_logit_bias is None:
            return logits
        bias = self.missing_logit_bias.to(logits.dtype).view(1, -1, 1, 1)  # [1, K, 1, 1]
        return logits + torch.where(missing.to(logits.device).view(-1, 1, 1, 1), bias, 0)  # [B, K, h, w]

    def prompts_at(self, block_index: int) -> bool:
        """Whether a prompter sits before block ``block_index``."""
        return block_index in self._slot

    def prompt(self, block_index: int, x: torch.Tensor, state: PromptState) -> tuple[torch.Tensor, PromptState]:
        """Applies the prompter of ``block_index`` (if any) to a block's input tokens."""
        slot = self._slot.get(block_index)
        if slot is None:
            return x, state
        return self.prompters[slot](x, self.spec.prefix_tokens(block_index), state)

    def extra_repr(self) -> str:
        return f"blocks={list(self.block_indices)}"
