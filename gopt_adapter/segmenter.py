"""What every segmenter of this library shares: a timm ViT whose blocks run one adapter's prompts.

:class:`SegmenterBase` holds the backbone (the user's timm model with its blocks wrapped,
:mod:`gopt_adapter.inject`) and the adapter in use (the contract of
:mod:`gopt_adapter.contract`). It owns the forward around the features (the adapter's head and
the bilinear upsampling), the input checks, train/eval, the freezing of the backbone and what
:func:`remove_gopt` gives back; each kind of segmenter computes its own ``features``.
:class:`PromptedSegmenter` is the kind every variant but the two-stream FFT is: one RGB pass
through the prompted blocks. GoPT's segmenter (:class:`~gopt_adapter.GoptSegmenter`) adds
several adapters, mixed batches, the aux-missing mode and adapter files; the baselines'
(:mod:`gopt_adapter.baselines`) a backbone that may train.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BackboneSpec
from .contract import AdapterConfig, SegmentationAdapter, check_adapter
from .inject import PromptContext, Route, is_wrapped, unwrap_blocks, wrap_blocks

DEFAULT_ADAPTER = "default"


class SegmenterBase(nn.Module):
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

        ``aux=None`` and ``aux_missing`` (bool ``[B]``) ask for an aux-missing mode, which only
        segmenters that have one accept (GoPT's, with an adapter trained with ``aux_dropout > 0``).
        """
        features = self.features(rgb, aux, aux_missing)  # [B, D, h, w]
        return self.upsample(self.adapter.head(features), rgb.shape[-2:])  # [B, K, H, W]

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """The features the head reads, ``[B, D, h, w]``: each kind of segmenter computes its own."""
        raise NotImplementedError(f"{type(self).__name__} does not define features()")

    def _require_aux(self, rgb: torch.Tensor, aux: torch.Tensor | None, aux_missing: torch.Tensor | None) -> None:
        """Checks the inputs of a segmenter without an aux-missing mode: every sample has its aux."""
        if aux is None or aux_missing is not None:
            raise ValueError(f"{type(self).__name__} has no aux-missing mode: give every sample an aux image "
                             "(GoPT adapters trained with aux_dropout > 0 have one)")
        self._check_inputs(rgb, aux)

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
    def train(self, mode: bool = True) -> "SegmenterBase":
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

    def release_backbone(self) -> nn.Module:
        """Unwraps the blocks, restores the flags and modes recorded at wrapping and hands the
        model back (:func:`remove_gopt`); a segmenter that changed more of the model undoes that
        first, in its override."""
        model = self.backbone
        unwrap_blocks(model)
        original = self._original
        for name, param in model.named_parameters():
            param.requires_grad_(original["requires_grad"][name])
        if original["grad_checkpointing"] is not None:
            model.grad_checkpointing = original["grad_checkpointing"]
        for name, module in model.named_modules():
            module.training = original["training"][name]
        del self._modules["backbone"]
        return model

    def extra_repr(self) -> str:
        return f"active_adapter={self._active!r}"


class PromptedSegmenter(SegmenterBase):
    """A segmenter whose features are one RGB pass through the prompted blocks (GoPT, VPT, LoRA,
    the probe): the adapter's prompts act on the tokens entering each block."""

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """Last block's patch tokens after the backbone's final norm, ``[B, D, h, w]``."""
        self._require_aux(rgb, aux, aux_missing)
        return self._prompted_features(rgb, [Route(self.adapter, None, self.adapter.initial_state(aux))])

    def _prompted_features(self, rgb: torch.Tensor, routes: list[Route]) -> torch.Tensor:
        """The backbone's features ``[B, D, h, w]`` with each route's prompters on its samples."""
        if getattr(self.backbone, "grad_checkpointing", False):
            raise RuntimeError("timm's grad checkpointing replays the prompters; use segmenter.set_grad_checkpointing()")
        with self._context.active(routes):
            return self.backbone_features(rgb)

    def backbone_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """What the backbone computes with no prompter: the frozen RGB model's features."""
        return self.backbone.forward_intermediates(
            rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]


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


def remove_gopt(segmenter: SegmenterBase) -> nn.Module:
    """Gives back the original timm model: module tree, keys, ``requires_grad`` flags and the
    train/eval mode of every submodule as they were when GoPT was applied.

    Works on every segmenter of this library (GoPT's and the baselines'); the segmenter is
    unusable afterwards.
    """
    if not isinstance(segmenter, SegmenterBase):
        raise TypeError(f"remove_gopt needs a segmenter (apply_gopt or a baseline), got {type(segmenter).__name__}")
    if "backbone" not in segmenter._modules:
        raise ValueError("GoPT was already removed from this segmenter")
    return segmenter.release_backbone()

__all__ = ["DEFAULT_ADAPTER", "PromptedSegmenter", "SegmenterBase", "check_adapter_name", "check_unwrapped",
           "remove_gopt"]
