"""What every segmenter of this library shares: a timm ViT whose blocks run one adapter's prompts.

:class:`PromptedSegmenter` holds the backbone (the user's timm model with its blocks wrapped,
:mod:`gopt_adapter.inject`) and the adapter in use (the contract of
:mod:`gopt_adapter.contract`). It owns the forward (input checks, the prompted blocks, the
final features, the adapter's head and the bilinear upsampling), train/eval, the freezing of
the backbone and what :func:`remove_gopt` restores. GoPT's segmenter
(:class:`~gopt_adapter.model.GoptSegmenter`) adds several adapters, mixed batches and adapter
files; the baselines' (:class:`~gopt_adapter.baselines.BaselineSegmenter`) a backbone that may
train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneSpec
from .contract import AdapterConfig, SegmentationAdapter, check_adapter
from .inject import PromptContext, Route, is_wrapped, unwrap_blocks, wrap_blocks

DEFAULT_ADAPTER = "default"


class PromptedSegmenter(nn.Module):
    """RGB-X segmenter: ``segmenter(rgb, aux) -> logits [B, num_classes, H, W]``.

    The backbone (``self.backbone``) is frozen and stays in eval mode; the adapter in use,
    ``self.adapters[self.active_adapter]``, trains. A forward pass keeps per-call state on the
    segmenter: do not run one segmenter from several threads at once.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: SegmentationAdapter,
                 adapter_name: str = DEFAULT_ADAPTER) -> None:
        check_adapter_name(adapter_name)  # before the model is touched
        check_adapter(adapter)
        super().__init__()
        self.spec = spec
        self._original = {  # what remove_gopt restores
            "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
            "training": {name: m.training for name, m in model.named_modules()},
            "grad_checkpointing": getattr(model, "grad_checkpointing", None),
        }
        self._context = PromptContext()
        model.requires_grad_(False)
        if self._original["grad_checkpointing"]:
            model.grad_checkpointing = False  # timm would replay our prompters; see set_grad_checkpointing
        wrap_blocks(model, self._context)
        self.backbone = model
        self.adapters = nn.ModuleDict()
        self._active: str | None = None
        self._insert(adapter_name, adapter)
        self._activate(adapter_name)
        self.train(model.training)

    # ----------------------------------------------------------------- forward
    def forward(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """``rgb [B, 3, H, W]`` and ``aux [B, C_aux, H, W]`` -> logits ``[B, K, H, W]``.

        Without an aux image (``aux=None``), or for the samples flagged in ``aux_missing``
        (bool ``[B]``; their aux values are not read), the adapter runs in its aux-missing
        mode. Only adapters trained with ``aux_dropout > 0`` have one.
        """
        features = self.features(rgb, aux, aux_missing)  # [B, D, h, w]
        logits = self.adapter.head(features)  # [B, K, h, w]
        bias = getattr(self.adapter, "missing_logit_bias", None)
        if bias is not None and (aux is None or aux_missing is not None):  # samples flagged as without aux
            missing = torch.ones(rgb.shape[0], dtype=torch.bool, device=logits.device) if aux is None else aux_missing
            logits = logits + torch.where(missing.to(logits.device).view(-1, 1, 1, 1),
                                          bias.to(logits.dtype).view(1, -1, 1, 1), 0)  # [B, K, h, w]
        return self.upsample(logits, rgb.shape[-2:])

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """Last block's patch tokens after the backbone's final norm, ``[B, D, h, w]``."""
        aux, aux_missing = self._missing_aux_inputs(rgb, aux, aux_missing)
        self._check_inputs(rgb, aux)
        adapter = self.adapter
        if getattr(adapter, "missing_aux", None) is None:
            state = adapter.initial_state(aux)
        else:  # training may drop any sample's aux: its stand-in tokens are made from its rgb
            state = adapter.initial_state(aux, aux_missing, rgb)
        return self._prompted_features(rgb, [Route(adapter, None, state)])

    def _prompted_features(self, rgb: torch.Tensor, routes: list[Route]) -> torch.Tensor:
        """The backbone's features ``[B, D, h, w]`` with each route's prompters on its samples."""
        if getattr(self.backbone, "grad_checkpointing", False):
            raise RuntimeError("timm's grad checkpointing replays the prompters; use segmenter.set_grad_checkpointing()")
        with self._context.active(routes):
            return self.backbone_features(rgb)

    def _missing_aux_inputs(self, rgb: torch.Tensor, aux: torch.Tensor | None,
                            aux_missing: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(aux, missing)`` for the adapter: ``aux=None`` becomes a zero image, all missing."""
        if aux is None and aux_missing is None:
            if rgb.ndim != 4:
                raise ValueError(f"expected rgb [B, {self.spec.in_chans}, H, W], got {tuple(rgb.shape)}")
            aux = rgb.new_zeros(rgb.shape[0], self.config.aux_channels, *rgb.shape[2:])
            aux_missing = torch.ones(rgb.shape[0], dtype=torch.bool, device=rgb.device)
        elif aux is None:
            raise ValueError("aux_missing needs an aux tensor (use aux=None when every sample lacks aux)")
        if aux_missing is None:
            return aux, None
        if getattr(self.adapter, "missing_aux", None) is None:
            raise ValueError(
                f"adapter {self.active_adapter!r} has no aux-missing mode (it was trained with aux_dropout=0, "
                "the default and the only setting of older adapter files, or it is a baseline): give every "
                "sample an aux image, or train an adapter with GoptConfig(aux_dropout > 0)"
            )
        if not isinstance(aux_missing, torch.Tensor) or aux_missing.dtype != torch.bool \
                or tuple(aux_missing.shape) != (aux.shape[0],):
            got = f"{aux_missing.dtype} {tuple(aux_missing.shape)}" if isinstance(aux_missing, torch.Tensor) \
                else type(aux_missing).__name__
            raise ValueError(f"aux_missing must be a bool tensor [B] = [{aux.shape[0]}], got {got}")
        return aux, aux_missing.to(aux.device)

    def backbone_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """What the backbone computes with no prompter: the frozen RGB model's features."""
        return self.backbone.forward_intermediates(
            rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]

    def upsample(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear upsampling of patch logits to the input size (padding cropped off)."""
        if self.spec.dynamic_img_pad:
            (ph, pw), (h, w) = self.spec.patch_size, logits.shape[-2:]
            logits = F.interpolate(logits, size=(h * ph, w * pw), mode="bilinear", align_corners=False)
            return logits[..., : size[0], : size[1]]
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def _check_inputs(self, rgb: torch.Tensor, aux: torch.Tensor) -> None:
        config, spec = self.config, self.spec
        shapes = f"rgb {tuple(rgb.shape)} and aux {tuple(aux.shape)}"
        expected = f"expected rgb [B, {spec.in_chans}, H, W] and aux [B, {config.aux_channels}, H, W]"
        if rgb.ndim != 4 or aux.ndim != 4:
            raise ValueError(f"{expected}, got {shapes}")
        if rgb.shape[1] != spec.in_chans:
            raise ValueError(f"wrong RGB channel count: {expected}, got {shapes}")
        if aux.shape[1] != config.aux_channels:
            raise ValueError(
                f"wrong aux channel count: adapter {self.active_adapter!r} takes {config.aux_channels}; {expected}, got {shapes}"
            )
        if rgb.shape[0] != aux.shape[0] or rgb.shape[2:] != aux.shape[2:]:
            raise ValueError(f"rgb and aux must share batch and spatial size, got {shapes}")
        spec.check_image_size(rgb.shape[2], rgb.shape[3])


    # ------------------------------------------------------------ train/eval
    def train(self, mode: bool = True) -> "PromptedSegmenter":
        """Adapters follow ``mode``; the frozen backbone stays in eval mode (subclasses may let it follow)."""
        super().train(mode)
        if "backbone" in self._modules:
            self.backbone.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the frozen blocks in backward (prompters run once) to save memory."""
        for block in self.backbone.blocks:
            block.checkpoint = enable

    # -------------------------------------------------------------- adapters
    @property
    def active_adapter(self) -> str:
        """Name of the adapter in use."""
        return self._active

    @property
    def adapter(self) -> SegmentationAdapter:
        """The adapter in use (the active one)."""
        return self.adapters[self._active]

    @property
    def config(self) -> AdapterConfig:
        """Config of the adapter in use."""
        return self.adapter.config

    def _insert(self, name: str, adapter: SegmentationAdapter) -> None:
        reference = next(iter(self.backbone.parameters()), None)
        if reference is not None:
            adapter.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        adapter.requires_grad_(False)
        adapter.train(self.training)
        self.adapters[name] = adapter

    def _activate(self, name: str) -> None:
        """Makes the held adapter ``name`` the one in use; only it has trainable parameters."""
        for key, adapter in self.adapters.items():
            adapter.requires_grad_(key == name)
        self._active = name

    def _restore_backbone(self, model: nn.Module) -> None:
        """Undoes what this segmenter changed in ``model`` besides wrapping its blocks (none here;
        a baseline that replaces modules of the backbone puts them back)."""

    def extra_repr(self) -> str:
        return f"active_adapter={self._active!r}"


def check_adapter_name(name: str) -> None:
    """Raises ``ValueError`` unless ``name`` can key an adapter (a non-empty string without '.')."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


def check_unwrapped(model: nn.Module, caller: str = "apply_gopt") -> None:
    """Refuses what ``caller`` cannot wrap: a non-module, or a model a segmenter already holds."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} needs a timm model (nn.Module), got {type(model).__name__}")
    if is_wrapped(model):
        advice = "use segmenter.add_adapter() for another task" if caller == "apply_gopt" else \
            "a baseline needs a model of its own (remove_gopt gives the wrapped one back)"
        raise ValueError(f"this model already has GoPT applied; {advice}")


def remove_gopt(segmenter: PromptedSegmenter) -> nn.Module:
    """Gives back the original timm model: module tree, keys, ``requires_grad`` flags and the
    train/eval mode of every submodule as they were when GoPT was applied.

    Works on every segmenter of this library (GoPT's and the baselines'); the segmenter is
    unusable afterwards.
    """
    if not isinstance(segmenter, PromptedSegmenter):
        raise TypeError(f"remove_gopt needs a segmenter (apply_gopt or a baseline), got {type(segmenter).__name__}")
    if "backbone" not in segmenter._modules:
        raise ValueError("GoPT was already removed from this segmenter")
    model = segmenter.backbone
    segmenter._restore_backbone(model)
    unwrap_blocks(model)
    original = segmenter._original
    for name, param in model.named_parameters():
        param.requires_grad_(original["requires_grad"][name])
    if original["grad_checkpointing"] is not None:
        model.grad_checkpointing = original["grad_checkpointing"]
    for name, module in model.named_modules():
        module.training = original["training"][name]
    del segmenter._modules["backbone"]
    return model


__all__ = ["DEFAULT_ADAPTER", "PromptedSegmenter", "check_adapter_name", "check_unwrapped", "remove_gopt"]
