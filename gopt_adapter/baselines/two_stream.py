"""Two token streams through one ViT, after channel-exchanging networks (CEN, Wang et al. 2022c).

The paper's FFT baseline is "extended from the foundation model by adding auxiliary modal
branches", its structure "inspired by" Wang et al. 2022c: "Channel exchanging networks for
multimodal and multitask dense image prediction" (TPAMI; the journal version of CEN,
NeurIPS 2020). CEN runs one network per modality with *shared* convolution weights and
*private* BatchNorms, and after a BatchNorm replaces the channels whose scaling factor
``|gamma|`` is small by the other modality's output; an L1 penalty on a share of the gammas
(disjoint shares per modality) makes some of them small. These are the pieces of that design
for a timm ViT, which :func:`gopt_adapter.baselines.build_fft` assembles:

- :class:`ModalityLayerNorm`: a LayerNorm with a private copy for the aux stream, CEN's
  exchange on its outputs, and the L1 term of its share (:meth:`~ModalityLayerNorm.penalty`);
- :func:`split_norms` puts one in place of every LayerNorm of the blocks and the final norm;
- :func:`aux_patch_embedding`: the aux stream's patch embedding, a copy of the backbone's
  with ``C_aux`` input channels;
- :class:`StreamFusion`: the learned per-channel convex combination of the two streams;
- :func:`two_stream_features`: runs both streams through the shared blocks as one batch.

The two streams travel stacked along dim 0: rows ``:B`` are RGB, rows ``B:`` aux. What is
CEN's and what is our reading is listed in docs/method.md ("FFT").
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

#: Defaults (our choices, see docs/method.md): CEN's threshold on ``|gamma|``, the share of
#: each stream's channels exchanged whatever their gains, and the L1 weight.
EXCHANGE_THRESHOLD = 2e-2
EXCHANGE_RATIO = 0.1
EXCHANGE_L1 = 1e-4


def check_exchange_settings(threshold: float, ratio: float, l1: float = 0.0) -> None:
    """``ValueError`` unless ``threshold >= 0``, ``0 <= ratio < 1`` and ``l1 >= 0`` (numbers, not bools)."""
    for name, value, high in (("exchange_threshold", threshold, None), ("exchange_ratio", ratio, 1.0),
                              ("exchange_l1", l1, None)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 \
                or (high is not None and not value < high):
            bound = f"in [0, {high:g})" if high is not None else ">= 0"
            raise ValueError(f"{name} must be a number {bound}, got {value!r}")


def check_two_stream_model(model: nn.Module) -> None:
    """Raises ``TypeError`` unless ``model`` is a timm ``VisionTransformer`` whose stream
    embedding (patch embedding, position embedding, prefix tokens) this module can run twice."""
    from timm.models.vision_transformer import VisionTransformer

    name = f"{type(model).__module__}.{type(model).__qualname__}"
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"the two-stream FFT runs timm VisionTransformer models (patch_embed, _pos_embed), not "
                        f"{name}; use variant 'fft_early' for other families")
    proj = getattr(model.patch_embed, "proj", None)
    if not isinstance(proj, nn.Conv2d):
        raise TypeError(f"the two-stream FFT copies a Conv2d patch embedding (`patch_embed.proj`); {name} has "
                        f"{type(proj).__name__}: use variant 'fft_early'")
    if not isinstance(model.norm, nn.LayerNorm):
        raise TypeError(f"the two-stream FFT needs a final LayerNorm (`norm`); {name} has {type(model.norm).__name__}")


class ModalityLayerNorm(nn.LayerNorm):
    """A LayerNorm over two stacked streams ``[2B, ..., D]``: RGB rows use ``weight``/``bias``
    (the backbone's own), aux rows the private ``aux_weight``/``aux_bias``.

    Exchange (CEN's, on a LayerNorm's output instead of a BatchNorm's): channel ``c`` of the RGB
    output is replaced by the aux output's channel ``c`` when ``c`` is in the RGB share and its
    gain ``|weight[c]|`` is below ``threshold`` (CEN's rule) or among the ``floor(ratio * n)``
    smallest of the share's ``n`` gains (ours, ties by channel index); likewise for the aux
    output, the aux share and ``aux_weight``. The shares are disjoint halves of the channels
    (RGB the first ``D // 2``), as CEN's sparsity constraint is. ``threshold=0`` and
    ``ratio=0`` never exchange.
    """

    def __init__(self, norm: nn.LayerNorm, threshold: float = EXCHANGE_THRESHOLD,
                 ratio: float = EXCHANGE_RATIO) -> None:
        if not norm.elementwise_affine or norm.weight is None or norm.bias is None:
            raise TypeError("ModalityLayerNorm copies an affine LayerNorm with a bias")
        check_exchange_settings(threshold, ratio)
        super().__init__(norm.normalized_shape, eps=norm.eps, device="meta")
        self.weight, self.bias = norm.weight, norm.bias  # the RGB stream keeps the backbone's tensors
        object.__setattr__(self, "replaced", norm)  # not a submodule: what merge_norms puts back
        self.aux_weight = nn.Parameter(norm.weight.detach().clone())  # initialised from the RGB norm
        self.aux_bias = nn.Parameter(norm.bias.detach().clone())
        self.threshold, self.ratio = float(threshold), float(ratio)

    @property
    def rgb_share(self) -> torch.Tensor:
        """Bool ``[D]``: the first ``D // 2`` channels, the RGB stream's share (the rest is aux's)."""
        channels = self.weight.shape[-1]
        return torch.arange(channels, device=self.weight.device) < channels // 2

    def _share_mask(self, gains: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Bool ``[D]``: the channels ``start:stop`` whose gain is below the threshold or among the
        smallest (static shapes: no data-dependent indexing, so it traces and compiles)."""
        gains = gains.detach().abs()[start:stop]  # [n]
        share = gains < self.threshold  # [n]
        count = int(self.ratio * (stop - start))
        if count:  # rank of each gain, ties by channel index (a stable sort's order; ONNX has no stable sort)
            index = torch.arange(gains.shape[0], device=gains.device)
            earlier = (gains[None, :] < gains[:, None]) | ((gains[None, :] == gains[:, None]) & (index[None, :] < index[:, None]))
            share = share | (earlier.sum(dim=1) < count)  # [n, n] -> [n]
        mask = torch.zeros(self.weight.shape, dtype=torch.bool, device=gains.device)  # [D]
        mask[start:stop] = share
        return mask

    def exchange_masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(rgb_takes_aux, aux_takes_rgb)``, bool ``[D]``: the channels each stream takes from the other."""
        channels = self.weight.shape[-1]
        half = channels // 2
        return self._share_mask(self.weight, 0, half), self._share_mask(self.aux_weight, half, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] % 2:
            raise ValueError(f"ModalityLayerNorm takes two stacked streams [2B, ...], got batch {x.shape[0]}")
        half = x.shape[0] // 2
        rgb, aux = x[:half], x[half:]  # [B, ..., D] each (slices: chunk exports as a split the exporter cannot fold)
        rgb = F.layer_norm(rgb, self.normalized_shape, self.weight, self.bias, self.eps)
        aux = F.layer_norm(aux, self.normalized_shape, self.aux_weight, self.aux_bias, self.eps)
        if self.threshold > 0 or self.ratio > 0:
            rgb_takes, aux_takes = self.exchange_masks()
            rgb, aux = torch.where(rgb_takes, aux, rgb), torch.where(aux_takes, rgb, aux)
        return torch.cat([rgb, aux])  # [2B, ..., D]

    def penalty(self) -> torch.Tensor:
        """CEN's L1 term: ``sum |weight|`` over the RGB share plus ``sum |aux_weight|`` over the aux share."""
        share = self.rgb_share.to(self.weight.dtype)
        return (self.weight.abs() * share).sum() + (self.aux_weight.abs() * (1 - share)).sum()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold:g}, ratio={self.ratio:g}"


def split_norms(model: nn.Module, threshold: float = EXCHANGE_THRESHOLD,
                ratio: float = EXCHANGE_RATIO) -> list[ModalityLayerNorm]:
    """Replaces every ``nn.LayerNorm`` in ``model.blocks`` and ``model.norm`` by a
    :class:`ModalityLayerNorm` holding the same RGB tensors; returns them in model order."""
    targets = [(model.blocks, name) for name, module in model.blocks.named_modules() if isinstance(module, nn.LayerNorm)]
    targets.append((model, "norm"))
    norms = [ModalityLayerNorm(root.get_submodule(name), threshold, ratio) for root, name in targets]  # all checked first
    for (root, name), norm in zip(targets, norms):
        parent, _, attr = name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attr, norm)
    return norms


def merge_norms(model: nn.Module) -> None:
    """Undoes :func:`split_norms`: every :class:`ModalityLayerNorm` gives way to the very
    LayerNorm module it replaced (timm's class included), which holds the same, fine-tuned RGB
    tensors; the aux copies are dropped."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ModalityLayerNorm):
            parent, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, module.replaced)


def aux_patch_embedding(patch_embed: nn.Module, aux_channels: int) -> nn.Module:
    """The aux stream's patch embedding: a copy of ``patch_embed`` (same stride, padding, output
    layout) whose ``proj`` takes ``aux_channels`` channels.

    Its filters are the RGB filters summed over colour and split evenly over the aux channels:
    an aux image whose channels all equal ``g`` embeds exactly as the RGB image with all three
    colours equal to ``g``. So at init the aux stream is the foundation model looking at the aux
    image as a grey picture, as CEN starts every modality from the pretrained network.
    """
    embed = copy.deepcopy(patch_embed)
    rgb = patch_embed.proj
    embed.proj = nn.Conv2d(aux_channels, rgb.out_channels, rgb.kernel_size, rgb.stride, rgb.padding,
                           bias=rgb.bias is not None, device=rgb.weight.device, dtype=rgb.weight.dtype)
    with torch.no_grad():
        embed.proj.weight.copy_(rgb.weight.sum(1, keepdim=True).expand_as(embed.proj.weight) / aux_channels)
        if rgb.bias is not None:
            embed.proj.bias.copy_(rgb.bias)
    if hasattr(embed, "in_chans"):
        embed.in_chans = aux_channels
    return embed


class StreamFusion(nn.Module):
    """``w * rgb + (1 - w) * aux`` per channel, ``w = sigmoid(logit)``, ``logit`` starting at 0
    (the mean of the streams). ``[B, D, h, w]`` twice -> ``[B, D, h, w]``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.logit = nn.Parameter(torch.zeros(dim))

    def forward(self, rgb: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        weight = torch.sigmoid(self.logit)[:, None, None]  # [D, 1, 1]
        return aux + weight * (rgb - aux)


def two_stream_features(model: nn.Module, aux_embed: nn.Module, rgb: torch.Tensor,
                        aux: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both streams' final-norm patch features ``([B, D, h, w], [B, D, h, w])`` (RGB, aux).

    RGB tokens come from ``model.patch_embed``, aux tokens from ``aux_embed``; both then get the
    backbone's own position embedding and prefix tokens (``_pos_embed``, one call over the
    stacked ``[2B, ...]`` batch) and run through the shared ``model.blocks`` and ``model.norm``
    (whose :class:`ModalityLayerNorm` layers keep the streams' norms apart).
    """
    batch, (height, width) = rgb.shape[0], rgb.shape[-2:]
    x = torch.cat([model.patch_embed(rgb), aux_embed(aux)])  # [2B, h, w, D] or [2B, S, D]
    x = model.norm_pre(model.patch_drop(model._pos_embed(x)))  # [2B, P + S, D]
    for block in model.blocks:
        x = block(x)
    x = model.norm(x)[:, model.num_prefix_tokens:]  # [2B, S, D]
    h, w = model.patch_embed.dynamic_feat_size((height, width))
    x = x.reshape(2 * batch, h, w, -1).permute(0, 3, 1, 2)  # [2B, D, h, w]
    return x[:batch], x[batch:]


__all__ = [
    "EXCHANGE_L1",
    "EXCHANGE_RATIO",
    "EXCHANGE_THRESHOLD",
    "ModalityLayerNorm",
    "StreamFusion",
    "aux_patch_embedding",
    "check_exchange_settings",
    "check_two_stream_model",
    "merge_norms",
    "split_norms",
    "two_stream_features",
]
