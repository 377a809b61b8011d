"""Segmentation metrics from one confusion matrix accumulated over a whole split."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["SegMetrics", "row_normalized"]


class SegMetrics:
    """Confusion-matrix accumulator for semantic segmentation.

    Conventions (those of ``docs/datasets.md``):

    * One ``[K, K]`` int64 confusion matrix over all pixels seen; rows are ground truth,
      columns prediction. Pixels whose target is outside ``[0, K)`` (the ignore value
      ``ignore_index``, 255 by default) are dropped; predictions must lie in ``[0, K)``.
    * ``pixel_acc`` = ``oa`` = trace / total.
    * per-class accuracy ``acc[k]`` = diagonal / row sum; ``mean_acc`` = ``aa`` = mean over
      classes present in the ground truth (a class with an empty row has ``nan`` accuracy
      and is left out).
    * ``iou[k]`` = diagonal / (row sum + column sum - diagonal); a class absent from both
      ground truth and prediction has ``nan`` IoU and is left out of ``miou``. A class
      predicted but absent from the ground truth has IoU 0 and counts.
    * ``f1[k]`` (= Dice) = 2 diagonal / (row sum + column sum); ``mean_f1`` leaves out and
      counts classes exactly as ``miou`` does (F1 and IoU share their denominator's zeros).
    * ``kappa`` = (p_o - p_e) / (1 - p_e), p_o = OA, p_e = sum_k row_k col_k / total^2;
      defined as 1.0 when p_e = 1 and p_o = 1 (a single class everywhere, all correct).
    * ``predicted_pixels[k]`` = column sum (pixels predicted as ``k``); ``predicted_classes`` =
      the number of classes predicted at all: 1 flags a collapsed model (one class everywhere).
    * ``confusion`` = the matrix itself (pixel counts, rows ground truth); :func:`row_normalized`
      turns it into the share of each class's pixels predicted as each class.

    All values are fractions (multiply by 100 for the paper's percent); they lie in [0, 1]
    except kappa, which lies in [-1, 1] and is negative only for worse-than-chance
    agreement. With no pixel counted every value is ``nan``.

    The matrix lives on the device of the first ``update`` (or ``device``); ``update``
    never leaves that device except for one scalar range check. Under DDP call
    :meth:`sync` (a SUM all-reduce of the matrix) before :meth:`compute`; two
    accumulators can also be combined with ``+`` / :meth:`merge`.
    """

    def __init__(self, num_classes: int, ignore_index: int = 255, device: torch.device | str | None = None) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id in [0, {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.confmat: torch.Tensor | None = (
            None if device is None else torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
        )

    def reset(self) -> None:
        """Zero the matrix (keeps its device)."""
        if self.confmat is not None:
            self.confmat.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: integer label maps of equal shape (any leading dimensions).

        ``pred`` must be class ids, not logits: take ``logits.argmax(1)`` first.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred and target shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
        if pred.is_floating_point() or target.is_floating_point():
            raise ValueError(f"pred and target must be integer label maps, got {pred.dtype} and {target.dtype}")
        k = self.num_classes
        if self.confmat is None:
            self.confmat = torch.zeros(k, k, dtype=torch.int64, device=target.device)
        pred = pred.reshape(-1).to(device=self.confmat.device, dtype=torch.int64)
        target = target.reshape(-1).to(device=self.confmat.device, dtype=torch.int64)
        keep = (target >= 0) & (target < k)  # [N] bool
        pred, target = pred[keep], target[keep]
        if pred.numel() and (int(pred.min()) < 0 or int(pred.max()) >= k):
            raise ValueError(
                f"predictions must be class ids in [0, {k}); found range [{int(pred.min())}, {int(pred.max())}]"
            )
        self.confmat += torch.bincount(target * k + pred, minlength=k * k).view(k, k)  # rows: target

    def merge(self, other: "SegMetrics") -> "SegMetrics":
        """Add another accumulator's counts into this one (same ``num_classes``)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"cannot merge {other.num_classes}-class metrics into {self.num_classes}-class metrics")
        if other.confmat is not None:
            if self.confmat is None:
                self.confmat = other.confmat.clone()
            else:
                self.confmat += other.confmat.to(self.confmat.device)
        return self

    def __add__(self, other: "SegMetrics") -> "SegMetrics":
        out = SegMetrics(self.num_classes, self.ignore_index)
        return out.merge(self).merge(other)

    def sync(self, group: Any = None) -> None:
        """Sum the matrix over all processes of ``group`` (no-op without torch.distributed)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        if self.confmat is None:
            # Every rank must take part in the collective even if it saw no batch.
            device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend(group) == "nccl" else "cpu"
            self.confmat = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64, device=device)
        dist.all_reduce(self.confmat, op=dist.ReduceOp.SUM, group=group)

    def compute(self) -> dict[str, Any]:
        """Return ``pixel_acc, oa, mean_acc, aa, miou, mean_f1, kappa`` (floats), ``iou, f1, acc``
        (per-class lists of floats, ``nan`` where undefined), ``predicted_pixels`` (per-class ints),
        ``predicted_classes``, ``total`` pixels and ``confusion`` (``[K, K]`` lists of ints)."""
        k = self.num_classes
        cm = (self.confmat if self.confmat is not None else torch.zeros(k, k, dtype=torch.int64)).double().cpu()
        total = float(cm.sum())
        nan = float("nan")
        confusion = [[int(v) for v in row] for row in cm]
        if total == 0:
            return {"pixel_acc": nan, "oa": nan, "mean_acc": nan, "aa": nan, "miou": nan, "mean_f1": nan,
                    "kappa": nan, "iou": [nan] * k, "f1": [nan] * k, "acc": [nan] * k, "predicted_pixels": [0] * k,
                    "predicted_classes": 0, "total": 0, "confusion": confusion}
        diag = cm.diagonal()
        rows, cols = cm.sum(1), cm.sum(0)  # ground-truth and prediction counts per class
        union = rows + cols - diag
        acc = torch.where(rows > 0, diag / rows.clamp(min=1), torch.full_like(diag, nan))
        iou = torch.where(union > 0, diag / union.clamp(min=1), torch.full_like(diag, nan))
        f1 = torch.where(union > 0, 2 * diag / (rows + cols).clamp(min=1), torch.full_like(diag, nan))  # = Dice
        p_o = float(diag.sum()) / total
        p_e = float((rows * cols).sum()) / total**2
        kappa = 1.0 if p_e >= 1.0 else (p_o - p_e) / (1.0 - p_e)
        mean_acc = float(acc[~acc.isnan()].mean())
        miou = float(iou[~iou.isnan()].mean())
        mean_f1 = float(f1[~f1.isnan()].mean())
        return {
            "pixel_acc": p_o,
            "oa": p_o,
            "mean_acc": mean_acc,
            "aa": mean_acc,
            "miou": miou,
            "mean_f1": mean_f1,
            "kappa": kappa,
            "iou": [float(v) for v in iou],
            "f1": [float(v) for v in f1],
            "acc": [float(v) for v in acc],
            "predicted_pixels": [int(v) for v in cols],
            "predicted_classes": int((cols > 0).sum()),
            "total": int(total),
            "confusion": confusion,
        }

    def __repr__(self) -> str:
        total = 0 if self.confmat is None else int(self.confmat.sum())
        return f"SegMetrics(num_classes={self.num_classes}, ignore_index={self.ignore_index}, pixels={total})"


def row_normalized(confusion: Any) -> torch.Tensor:
    """A confusion matrix (rows ground truth, e.g. ``compute()["confusion"]``) with each row
    divided by its sum: float64 ``[K, K]``, row ``k`` the shares of class ``k``'s pixels
    predicted as each class (summing to 1); ``nan`` rows for classes with no pixels."""
    counts = torch.as_tensor(confusion, dtype=torch.float64)  # [K, K]
    rows = counts.sum(1, keepdim=True)  # [K, 1]
    return torch.where(rows > 0, counts / rows.clamp(min=1), torch.full_like(counts, float("nan")))

