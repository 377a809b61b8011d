"""Decision calibration of the aux-missing mode: per-class logit offsets that make the classes
predicted without aux as frequent as they are in the training labels.

Why: without aux, classes that only aux tells apart (a picture on a wall and a cabinet of the
same colour; a person and a shadow at night) look alike. A model trained with cross-entropy
then gives them nearly equal probabilities, and the argmax hands every such pixel to whichever
class a small bias favours: the other class is never predicted (docs/method.md, "When the aux
image is missing"). Shifting each class's logit by a constant ``b_c`` chosen so that the
argmax over training pixels predicts class ``c`` as often as it occurs divides those pixels
between the classes instead, and leaves the pixels the model is sure of as they were.

The offsets solve a convex problem: ``min_b mean_i max_c (L_ic + b_c) - sum_c t_c b_c``, whose
subgradient is (predicted share - target share); we minimise its smooth form (``max`` ->
temperature-``tau`` log-sum-exp) with L-BFGS. They live in the adapter
(``GoptAdapter.missing_logit_bias``), are saved in its file and are added only to the logits of
samples without aux.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .labels import IGNORE_INDEX
from .segmenter import SegmenterBase

__all__ = ["CalibrationReport", "calibrate_missing_mode", "fit_class_offsets"]


def fit_class_offsets(logits: torch.Tensor, labels: torch.Tensor, num_classes: int, tau: float = 0.05,
                      steps: int = 200, l2: float = 1e-4) -> torch.Tensor:
    """Offsets ``b [K]`` such that ``(logits + b).argmax(1)`` predicts each class about as often
    as it occurs in ``labels``.

    ``logits [N, K]`` and ``labels [N]`` (values in ``[0, K)``) are pixels. ``tau`` is the
    temperature of the smoothed argmax, in logit units; ``l2`` keeps the offsets of classes
    absent from ``labels`` finite. The offsets are centred (mean 0): a common shift changes
    nothing.
    """
    if logits.ndim != 2 or logits.shape[1] != num_classes:
        raise ValueError(f"logits must be [N, {num_classes}], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"labels must be [N] = [{logits.shape[0]}], got {tuple(labels.shape)}")
    if labels.numel() == 0:
        raise ValueError("no labelled pixels to calibrate on")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    logits = logits.detach().double() / tau  # [N, K]
    target = torch.bincount(labels, minlength=num_classes).double() / labels.numel()  # [K]
    offsets = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)  # in units of tau
    optimizer = torch.optim.LBFGS([offsets], lr=1, max_iter=steps, line_search_fn="strong_wolfe",
                                  tolerance_grad=1e-9, tolerance_change=1e-12)

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        penalty = 0.5 * l2 * (tau * offsets).square().sum()  # on the offsets in logit units
        loss = torch.logsumexp(logits + offsets, dim=1).mean() - target @ offsets + penalty
        loss.backward()
        return loss

    optimizer.step(objective)
    offsets = offsets.detach() * tau
    return (offsets - offsets.mean()).float()


@dataclass(frozen=True)
class CalibrationReport:
    """What :func:`calibrate_missing_mode` fitted and on how many pixels.

    ``target``, ``before`` and ``after`` are per-class shares ``[K]`` of the pixels: in the
    labels, predicted without aux before, and predicted after the offsets ``bias``.
    """

    bias: torch.Tensor
    pixels: int
    target: torch.Tensor
    before: torch.Tensor
    after: torch.Tensor

    def largest_change(self) -> float:
        """The largest absolute change of a class's predicted share."""
        return float((self.after - self.before).abs().max())

    def summary(self) -> str:
        """One line for a log: how many pixels, and how far the predicted shares moved."""
        return (f"calibrated the aux-missing mode on {self.pixels:,} training pixels (largest change of a class's "
                f"predicted share: {self.largest_change():.3f})")


@torch.no_grad()
def calibrate_missing_mode(segmenter: SegmenterBase, dataset, max_samples: int = 1000,
                           max_pixels: int = 1 << 20, seed: int = 0, ignore_index: int = IGNORE_INDEX) -> CalibrationReport:
    """Fits the active adapter's ``missing_logit_bias`` on ``dataset`` (its training data) and
    stores it in the adapter; returns a :class:`CalibrationReport`.

    ``dataset[i]`` gives ``{"rgb": [3, H, W], "label": [H, W]}`` (aux is not read). Up to
    ``max_samples`` evenly spaced samples and ``max_pixels`` labelled pixels, spread evenly over
    them and drawn with ``seed``, are used. The segmenter runs in eval mode, one sample at a
    time, on its own device. Fit on training data: offsets fitted on the evaluation set would
    leak its class frequencies into its scores.
    """
    adapter = segmenter.adapter
    if getattr(adapter, "missing_logit_bias", None) is None:
        raise ValueError("this adapter has no aux-missing mode to calibrate: train it with GoptConfig(aux_dropout > 0)")
    if len(dataset) == 0:
        raise ValueError("calibrate_missing_mode needs a non-empty dataset")
    num_classes = adapter.config.num_classes
    count = min(len(dataset), max_samples)
    indices = [i * len(dataset) // count for i in range(count)]
    per_sample = max(1, math.ceil(max_pixels / count))
    generator = torch.Generator().manual_seed(seed)
    was_training = segmenter.training
    saved = adapter.missing_logit_bias.clone()
    try:  # all-or-nothing: any failure leaves the old offsets and the mode
        segmenter.eval()
        adapter.missing_logit_bias.zero_()  # fit on the uncalibrated logits
        logits, labels = _missing_mode_pixels(segmenter, dataset, indices, per_sample, generator, ignore_index)
        bias = fit_class_offsets(logits, labels, num_classes)
    except BaseException:
        adapter.missing_logit_bias.copy_(saved)
        raise
    finally:
        segmenter.train(was_training)
    adapter.missing_logit_bias.copy_(bias.to(saved.device))

    def shares(scores: torch.Tensor) -> torch.Tensor:
        return torch.bincount(scores.argmax(1), minlength=num_classes).float() / scores.shape[0]

    target = torch.bincount(labels, minlength=num_classes).float() / labels.numel()
    return CalibrationReport(bias, labels.numel(), target, shares(logits), shares(logits + bias))


def _missing_mode_pixels(segmenter: SegmenterBase, dataset, indices: list[int], per_sample: int,
                         generator: torch.Generator, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits without aux ``[N, K]`` (on the CPU) and labels ``[N]`` of up to ``per_sample``
    labelled pixels of each sample in ``indices``."""
    device = segmenter.adapter.missing_logit_bias.device
    num_classes = segmenter.adapter.config.num_classes
    all_logits, all_labels = [], []
    for index in indices:
        sample = dataset[index]
        labels = sample["label"].reshape(-1)  # [H*W]
        keep = (labels != ignore_index).nonzero().squeeze(1)
        keep = keep[torch.randperm(keep.numel(), generator=generator)[:per_sample]]
        logits = segmenter(sample["rgb"][None].to(device), None)[0]  # [K, H, W]
        all_logits.append(logits.reshape(num_classes, -1)[:, keep.to(device)].T.cpu())  # [n, K]
        all_labels.append(labels[keep].long())
    return torch.cat(all_logits), torch.cat(all_labels)
