"""What every baseline shares: its config, the RGB-only adapter they all extend, and the
backbone-training regimes (frozen, full fine-tuning, LoRA); the RGB-only rows (Foundation, probe).

The registry of all rows is :mod:`gopt_adapter.baselines.variants`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from ..adapter import xavier_init_
from ..backbone import BackboneSpec
from ..config import HEADS, check_positive_int
from ..contract import SegmentationAdapter
from ..heads import build_head
from ..prompter import AuxPatchEmbed
from ..segmenter import DEFAULT_ADAPTER, PromptedSegmenter, check_unwrapped
from ..tokens import add_to_patch_tokens

BACKBONE_TRAINING = ("frozen", "full", "lora")
# timm's image-classification tail (forward_head): the dense head replaces it, no gradient
# reaches it, so full fine-tuning leaves it frozen.
CLASSIFIER_MODULES = ("fc_norm", "attn_pool", "head", "head_dist")

# --------------------------------------------------------------------------- config
@dataclass(frozen=True)
class BaselineConfig:
    """What a baseline adapter needs besides the backbone (the segmenter reads ``aux_channels``).

    ``variant`` is a label (the registry name) so a printed model says what it is.
    """

    variant: str
    aux_channels: int
    num_classes: int
    head: str = "setr_naive"
    head_channels: int = 256

    def __post_init__(self) -> None:
        for name in ("aux_channels", "num_classes", "head_channels"):
            check_positive_int(name, getattr(self, name))
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")


# ---------------------------------------------------------------- building blocks
class FullWidthAuxEmbed(AuxPatchEmbed):
    """``Conv2d(C_aux, D, patch, patch)`` on the backbone's patch grid, starting at zero.

    ``[B, C_aux, H, W] -> [B, S, D]``. Reuses :class:`AuxPatchEmbed` (same kernel, stride and
    padding rule as the frozen RGB patch embedding) without its LayerNorm: a zero-initialised
    conv followed by a LayerNorm gives zero tokens at init but a ~1/sqrt(eps) gradient, so the
    first optimiser step would jump to unit-scale prompts (and a zero LayerNorm gain would
    block every gradient instead). The plain conv is also what the paper's VPT-style
    variants and FFT describe: an embedding of the aux image at the backbone's width.
    """

    def __init__(self, in_chans: int, spec: BackboneSpec) -> None:
        super().__init__(in_chans, spec.embed_dim, spec.patch_size, spec.dynamic_img_pad, norm=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


# ------------------------------------------------------------------- adapters
class BaselineAdapter(nn.Module, SegmentationAdapter):
    """A baseline's own weights, implementing the adapter contract (:mod:`gopt_adapter.contract`).

    The segmenter calls ``initial_state(aux)`` once per forward and ``prompt(block_index, x,
    state)`` before every block, then ``head`` on the final features. This base class is the
    RGB-only Foundation adapter: a head, and a ``prompt`` that leaves the tokens alone. Its
    state is the aux image itself, which subclasses embed where they need it.
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec) -> None:
        super().__init__()
        self.config = config
        self.spec = spec
        self.head = build_head(config.head, spec.num_features, config.num_classes, config.head_channels)
        xavier_init_(self.head)

    def initial_state(self, aux: torch.Tensor) -> torch.Tensor:
        return aux  # [B, C_aux, H, W], handed unchanged from block to block

    def prompts_at(self, block_index: int) -> bool:
        """Whether ``prompt`` changes the tokens entering block ``block_index``."""
        return False

    def prompt(self, block_index: int, x: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, aux

    def extra_repr(self) -> str:
        return f"variant={self.config.variant!r}"


class AdditiveAuxAdapter(BaselineAdapter):
    """Adds aux tokens to the patch tokens entering block 0: ``x <- x + aux_embed(aux)``.

    FFT-early uses a :class:`FullWidthAuxEmbed` (our earlier, single-stream reading of the
    paper's FFT), LoRA a :class:`NarrowAuxEmbed`. Both start at
    zero, so the model starts as its RGB model.
    """

    def __init__(self, config: BaselineConfig, spec: BackboneSpec, aux_embed: nn.Module) -> None:
        super().__init__(config, spec)
        self.aux_embed = aux_embed  # [B, C_aux, H, W] -> [B, S, D]

    def prompts_at(self, block_index: int) -> bool:
        return block_index == 0

    def prompt(self, block_index: int, x: torch.Tensor, aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if block_index != 0:
            return x, aux
        return add_to_patch_tokens(x, self.spec.prefix_tokens(0), self.aux_embed(aux)), aux


# ------------------------------------------------------------------ segmenter
class BackboneTraining:
    """Which backbone weights of a baseline segmenter train, by regime (:data:`BACKBONE_TRAINING`).

    A mixin for :class:`~gopt_adapter.segmenter.SegmenterBase` subclasses: call
    :meth:`_set_backbone_training` once the segmenter has frozen and wrapped the backbone.
    """

    backbone_training = "frozen"

    def _set_backbone_training(self, regime: str) -> None:
        check_backbone_training(regime)
        self.backbone_training = regime
        for name, param in self.backbone.named_parameters():
            if regime == "full":
                param.requires_grad_(name.split(".", 1)[0] not in CLASSIFIER_MODULES)
            elif regime == "lora" and "lora_" in name:
                param.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True):
        super().train(mode)  # backbone back in eval mode
        if self.backbone_training == "full":
            self.backbone.train(mode)
        return self


def check_backbone_training(regime: str) -> None:
    if regime not in BACKBONE_TRAINING:
        raise ValueError(f"backbone_training must be one of {BACKBONE_TRAINING}, got {regime!r}")


class BaselineSegmenter(BackboneTraining, PromptedSegmenter):
    """A segmenter whose backbone may train, holding one baseline adapter.

    ``backbone_training``:

    - ``"frozen"``: exactly GoPT's regime (VPT): no backbone weight trains, eval mode always.
    - ``"full"``: every backbone weight on the feature path trains (all but timm's
      classification tail, :data:`CLASSIFIER_MODULES`) and the backbone follows
      ``train()``/``eval()`` (Foundation, FFT: full fine-tuning, dropout and drop-path active
      in training).
    - ``"lora"``: only the ``lora_`` weights peft put into the backbone train; the backbone
      stays in eval mode as GoPT's does.

    Baselines are benchmark models, not GoPT tasks: adapter files hold GoPT adapters only,
    and a baseline's trained weights may live in the backbone, so it has none of
    :class:`~gopt_adapter.GoptSegmenter`'s adapter-file and multi-adapter methods (``save_adapter`` and
    ``load_adapter`` raise :class:`~gopt_adapter.errors.AdapterError`). Save with
    ``torch.save(segmenter.state_dict(), path)``.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: BaselineAdapter,
                 backbone_training: str = "frozen") -> None:
        check_backbone_training(backbone_training)
        super().__init__(model, spec, adapter, DEFAULT_ADAPTER)  # freezes the backbone, eval mode
        self._set_backbone_training(backbone_training)

    def extra_repr(self) -> str:
        return f"variant={self.config.variant!r}, backbone_training={self.backbone_training!r}"


def build_baseline(model: nn.Module, backbone_training: str,
           make_adapter: Callable[[BackboneSpec], BaselineAdapter],
           prepare: Callable[[nn.Module], None] | None = None) -> BaselineSegmenter:
    """Validates ``model`` and every option before anything changes it, then wraps it."""
    check_unwrapped(model, "a baseline")
    spec = BackboneSpec.from_model(model)
    adapter = make_adapter(spec)
    if prepare is not None:
        prepare(model)
    return BaselineSegmenter(model, spec, adapter, backbone_training)


# ------------------------------------------------------------------- RGB-only rows
def _build_rgb_only(variant: str, backbone_training: str, model: nn.Module, aux_channels: int, num_classes: int,
                    head: str, head_channels: int) -> BaselineSegmenter:
    """A head on the backbone's RGB features and nothing in front of any block (aux checked, ignored)."""
    config = BaselineConfig(variant, aux_channels, num_classes, head, head_channels)
    return build_baseline(model, backbone_training, lambda spec: BaselineAdapter(config, spec))


def build_foundation(model: nn.Module, num_classes: int, head: str = "setr_naive", *,
                     aux_channels: int = 1, head_channels: int = 256) -> BaselineSegmenter:
    """Table 4 "Foundation": the RGB-only SETR, the whole ViT and the head fine-tuned.

    The call stays ``model(rgb, aux)`` like every variant's; ``aux`` is checked (channel count
    ``aux_channels``, batch and size equal to rgb's) and then ignored, so a benchmark feeds all
    rows the same batches.
    """
    return _build_rgb_only("foundation", "full", model, aux_channels, num_classes, head, head_channels)


def build_probe(model: nn.Module, aux_channels: int, num_classes: int, head: str = "setr_naive", *,
                head_channels: int = 256) -> BaselineSegmenter:
    """The RGB-only row when the foundation stays frozen: the frozen backbone (eval mode) and
    GoPT's default head on its RGB features; only the head trains, ``aux`` is checked and then
    ignored. The floor any use of aux on a frozen backbone must beat (not in the paper).
    """
    return _build_rgb_only("probe", "frozen", model, aux_channels, num_classes, head, head_channels)
