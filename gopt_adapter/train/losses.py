"""The training losses behind ``train.loss``: the maths only (the trainer picks one, the recipe
counts the training labels).

* ``"ce"`` (default, the paper's): cross-entropy averaged over the pixels that are not ignored.
* ``"ce_weighted"``: the same with a weight per class, :func:`enet_class_weights` of the
  training labels' pixel counts (:func:`count_labels`), ENet's ``1 / ln(1.02 + p_k)``. We chose
  it over inverse or median frequency because it is bounded, between 1 / ln(2.02) = 1.42 and
  1 / ln(1.02) = 50.5: a class with a handful of pixels cannot dominate the loss, and a class
  absent from training gets a finite weight (which no target ever uses) instead of inf. The
  mean is weighted (``sum w_y l / sum w_y``), so only the ratios of the weights matter.
* ``"ohem"`` (online hard example mining, the OHEM cross-entropy of CMX's and DELIVER's code):
  only the pixels whose predicted probability of their true class is below ``thresh`` (0.7,
  DELIVER's) count, but at least the ``min_kept`` (an absolute count, as CMX's; 100000, mmseg's
  default) hardest of the batch, or every valid pixel when there are fewer.

Ignored pixels (255) never count, in the losses or in the counts. A batch without a valid
pixel gives what PyTorch's cross-entropy gives, for every loss alike: a NaN loss with zero
gradients, which the trainer skips and counts as a non-finite step.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Callable, Iterable

import torch
import torch.nn.functional as F

from ..labels import IGNORE_INDEX

__all__ = ["LOSSES", "OHEM_THRESH", "OHEM_MIN_KEPT", "ENET_C", "build_loss", "check_ohem_settings",
           "ohem_cross_entropy", "count_labels", "enet_class_weights"]

LOSSES = ("ce", "ce_weighted", "ohem")
OHEM_THRESH = 0.7  # DELIVER's OhemCrossEntropy
OHEM_MIN_KEPT = 100_000  # pixels per batch (mmseg's OHEM sampler default)
ENET_C = 1.02  # ENet's constant: weights lie in [1 / ln(1 + ENET_C), 1 / ln(ENET_C)]

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def ohem_cross_entropy(logits: torch.Tensor, target: torch.Tensor, thresh: float = OHEM_THRESH,
                       min_kept: int = OHEM_MIN_KEPT, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Cross-entropy averaged over the hard pixels of ``logits`` ``[B, K, H, W]`` and ``target``
    ``[B, H, W]``: those whose softmax probability of their class is below ``thresh``, or, when
    fewer are, the ``min_kept`` with the lowest (every valid pixel when there are fewer).

    With ``min_kept`` at least the number of valid pixels this is plain cross-entropy. The
    choice takes no gradient and no host sync.
    """
    with torch.no_grad():
        pixel_loss = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="none")  # [B, H, W]
        hard = pixel_loss > -math.log(thresh)  # p < thresh, i.e. -log p > -log thresh
        k = min(min_kept, pixel_loss.numel())
        hardest = pixel_loss.masked_fill(target == ignore_index, -math.inf).flatten().topk(k).indices  # [k]
        # the k hardest include every hard pixel when those are at least k: kept is the hard pixels, or
        # the k hardest; ignored pixels topk takes (fewer than k are valid) keep their ignore_index
        kept = hard.flatten().index_fill(0, hardest, True).view_as(hard)  # [B, H, W]
    return F.cross_entropy(logits, target.masked_fill(~kept, ignore_index), ignore_index=ignore_index)


def count_labels(labels: Iterable[torch.Tensor], num_classes: int, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Pixels per class, int64 ``[K]``, over label maps of any shape; ``ignore_index`` is not
    counted, any other value outside ``[0, K)`` raises ``ValueError``."""
    counts = torch.zeros(num_classes, dtype=torch.int64)
    for label in labels:
        values = label.flatten().to("cpu", torch.int64)
        values = values[values != ignore_index]
        if values.numel() and (int(values.min()) < 0 or int(values.max()) >= num_classes):
            raise ValueError(f"label values must be class ids in [0, {num_classes}) or {ignore_index}; found "
                             f"range [{int(values.min())}, {int(values.max())}]")
        counts += torch.bincount(values, minlength=num_classes)
    return counts


def enet_class_weights(counts: torch.Tensor, c: float = ENET_C) -> torch.Tensor:
    """ENet's class weights ``1 / ln(c + p_k)``, ``p_k`` = class ``k``'s share of the counted
    pixels; float32 ``[K]``, finite for absent classes. Raises ``ValueError`` when nothing was counted."""
    total = int(counts.sum())
    if total == 0:
        raise ValueError("no labelled pixel to weight the classes by (every training pixel is ignored)")
    return (1.0 / torch.log(c + counts.double() / total)).float()


def check_ohem_settings(thresh: float, min_kept: int) -> None:
    """Raises ``ValueError`` unless ``0 < thresh <= 1`` and ``min_kept`` is a positive integer
    (at least one pixel: with none kept, a batch of easy pixels would have no loss at all)."""
    if isinstance(thresh, bool) or not isinstance(thresh, (int, float)) or not 0 < thresh <= 1:
        raise ValueError(f"ohem_thresh must be a probability in (0, 1], got {thresh!r}")
    if isinstance(min_kept, bool) or not isinstance(min_kept, int) or min_kept < 1:
        raise ValueError(f"ohem_min_kept must be a positive integer (pixels per batch), got {min_kept!r}")


def build_loss(name: str, class_weights: torch.Tensor | None = None, ohem_thresh: float = OHEM_THRESH,
               ohem_min_kept: int = OHEM_MIN_KEPT, ignore_index: int = IGNORE_INDEX) -> Loss:
    """The loss ``name`` (one of :data:`LOSSES`) as ``loss(logits, target)``; ``class_weights``
    (float ``[K]``) is required by, and only taken by, ``"ce_weighted"``; the ``ohem_*`` settings
    are read by ``"ohem"`` alone."""
    if name not in LOSSES:
        raise ValueError(f"loss {name!r} is not one of {LOSSES}")
    if name == "ce_weighted" and class_weights is None:
        raise ValueError("loss 'ce_weighted' needs class_weights: enet_class_weights(count_labels(training labels))")
    if name != "ce_weighted" and class_weights is not None:
        raise ValueError(f"loss {name!r} takes no class_weights; only 'ce_weighted' does")
    check_ohem_settings(ohem_thresh, ohem_min_kept)
    if name == "ohem":
        return partial(ohem_cross_entropy, thresh=ohem_thresh, min_kept=ohem_min_kept, ignore_index=ignore_index)
    return partial(F.cross_entropy, weight=class_weights, ignore_index=ignore_index)
