"""Table 4's FFT (two streams through one fully fine-tuned ViT, after CEN) and our one-stream
FFT-early: the rows whose backbone trains whole."""

from __future__ import annotations

import torch
from torch import nn

from ..backbone import BackboneSpec
from ..segmenter import DEFAULT_ADAPTER, SegmenterBase, check_unwrapped
from .base import (
    AdditiveAuxAdapter,
    BackboneTraining,
    BaselineAdapter,
    BaselineConfig,
    BaselineSegmenter,
    FullWidthAuxEmbed,
    build_baseline,
)
from .two_stream import (
    EXCHANGE_L1,
    EXCHANGE_RATIO,
    EXCHANGE_THRESHOLD,
    ModalityLayerNorm,
    StreamFusion,
    aux_patch_embedding,
    check_exchange_settings,
    check_two_stream_model,
    merge_norms,
    split_norms,
    two_stream_features,
)

class TwoStreamAdapter(BaselineAdapter):
    """The two-stream FFT's own weights: the aux stream's patch embedding, the fusion and the head.

    ``aux_embed`` (:func:`~gopt_adapter.baselines.two_stream.aux_patch_embedding`) ``[B, C_aux, H, W]`` ->
    tokens laid out as the backbone's patch embedding lays out its own; ``fusion``
    (:class:`~gopt_adapter.baselines.two_stream.StreamFusion`) mixes the streams' features before the
    head. The per-stream LayerNorms live in the backbone (they replace its own).
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec, aux_embed: nn.Module) -> None:
        super().__init__(config, spec)
        self.aux_embed = aux_embed
        self.fusion = StreamFusion(spec.num_features)


class TwoStreamSegmenter(BackboneTraining, SegmenterBase):
    """Table 4 "FFT" as the paper builds it: CEN's two streams through one fully fine-tuned ViT.

    ``features`` runs the RGB and aux streams through the shared blocks
    (:func:`~gopt_adapter.baselines.two_stream.two_stream_features`) and fuses them;
    ``regularization_loss`` is CEN's L1 term on the exchange shares of the LayerNorm gains,
    which :class:`~gopt_adapter.train.engine.Trainer` adds to the loss. The backbone's LayerNorms are
    :class:`~gopt_adapter.baselines.two_stream.ModalityLayerNorm` layers, so it only runs two
    stacked streams: unlike the single-stream segmenters it has no RGB-only ``backbone_features``.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: TwoStreamAdapter,
                 exchange_l1: float = EXCHANGE_L1) -> None:
        super().__init__(model, spec, adapter, DEFAULT_ADAPTER)  # freezes the backbone, eval mode
        self._set_backbone_training("full")
        self.exchange_l1 = float(exchange_l1)

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """The fused streams' features ``[B, D, h, w]``; every sample needs its aux image."""
        self._require_aux(rgb, aux, aux_missing)
        return self.adapter.fusion(*self.stream_features(rgb, aux))

    def stream_features(self, rgb: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each stream's final-norm features before the fusion, ``([B, D, h, w], [B, D, h, w])``."""
        if getattr(self.backbone, "grad_checkpointing", False):
            raise RuntimeError("timm's grad checkpointing replays the blocks; use segmenter.set_grad_checkpointing()")
        return two_stream_features(self.backbone, self.adapter.aux_embed, rgb, aux)

    def release_backbone(self) -> nn.Module:
        merge_norms(self.backbone)  # plain LayerNorms with the fine-tuned RGB tensors, before the flags return
        return super().release_backbone()

    def exchange_norms(self) -> list[ModalityLayerNorm]:
        return [module for module in self.backbone.modules() if isinstance(module, ModalityLayerNorm)]

    def regularization_loss(self) -> torch.Tensor:
        """``exchange_l1 * sum`` of every :meth:`ModalityLayerNorm.penalty` (CEN's sparsity term)."""
        return self.exchange_l1 * sum(norm.penalty() for norm in self.exchange_norms())

    def extra_repr(self) -> str:
        return f"variant={self.config.variant!r}, backbone_training={self.backbone_training!r}, exchange_l1={self.exchange_l1:g}"


def build_fft(model: nn.Module, aux_channels: int, num_classes: int, head: str = "setr_naive", *,
              head_channels: int = 256, exchange_threshold: float = EXCHANGE_THRESHOLD,
              exchange_ratio: float = EXCHANGE_RATIO, exchange_l1: float = EXCHANGE_L1) -> TwoStreamSegmenter:
    """Table 4 "FFT", "extended from the foundation model by adding auxiliary modal branches"
    after CEN: see :class:`TwoStreamSegmenter` and :mod:`gopt_adapter.baselines.two_stream`.

    Everything trains: the shared blocks, both streams' LayerNorms, the aux patch embedding,
    the fusion and the head. ``exchange_threshold`` (``>= 0``) and ``exchange_l1`` (``>= 0``) are
    CEN's two settings; ``exchange_ratio`` (``[0, 1)``) the share of each stream's channels
    exchanged at every LayerNorm whatever their gains (ours; both 0: no exchange, see
    :class:`~gopt_adapter.baselines.two_stream.ModalityLayerNorm`). ``model`` must be a timm
    ``VisionTransformer`` (``TypeError`` otherwise; ``fft_early`` runs on every family).
    """
    config = BaselineConfig("fft", aux_channels, num_classes, head, head_channels)
    check_exchange_settings(exchange_threshold, exchange_ratio, exchange_l1)
    check_unwrapped(model, "build_fft")
    spec = BackboneSpec.from_model(model)
    check_two_stream_model(model)
    adapter = TwoStreamAdapter(config, spec, aux_patch_embedding(model.patch_embed, aux_channels))
    split_norms(model, exchange_threshold, exchange_ratio)
    return TwoStreamSegmenter(model, spec, adapter, exchange_l1)


def build_fft_early(model: nn.Module, aux_channels: int, num_classes: int, head: str = "setr_naive", *,
                    head_channels: int = 256) -> BaselineSegmenter:
    """FFT-early (ours, not the paper's form): full fine-tuning of one stream with an aux branch
    added to the tokens entering block 0.

    The aux branch is a :class:`FullWidthAuxEmbed` (``Conv2d(C_aux, D, patch, patch)``,
    starting at zero, so FFT-early starts as Foundation). Everything trains.
    """
    config = BaselineConfig("fft_early", aux_channels, num_classes, head, head_channels)
    return build_baseline(model, "full", lambda spec: AdditiveAuxAdapter(config, spec, FullWidthAuxEmbed(aux_channels, spec)))
