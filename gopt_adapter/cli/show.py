"""What ``gopt eval --show-dir DIR`` writes: a panel per evaluated image (or the N worst) and the
confusion matrix.

* ``DIR/<stem>.png`` for every image, as mmseg's ``tools/test.py --show-dir`` writes one figure
  per image: RGB | auxiliary | prediction | ground truth
  (:func:`~gopt_adapter.cli.visualize.make_eval_panel`: the class palette, wrong pixels hatched
  white, ignored ones in VOC's void colour), the image's own mIoU in the prediction's title.
  With ``worst=N`` only the N images of lowest mIoU (each image's mIoU over its own pixels;
  images with no labelled pixel are not ranked; of equal mIoU the earlier image is kept).
* ``DIR/confusion.csv`` and ``DIR/confusion.png``: the split's confusion matrix, row-normalised
  (:func:`~gopt_adapter.train.metrics.row_normalized`): row ``k`` holds the shares of class ``k``'s
  pixels predicted as each class and sums to 1; the csv's ``pixels`` column gives each row's
  pixel count, and its cells are empty for classes without pixels.

:class:`ShowWriter` is :func:`gopt_adapter.train.engine.evaluate`'s ``on_prediction``: panels are
drawn from the dataset's untransformed sample (``dataset.load(index)``) as the predictions
arrive; with ``worst`` only the N worst predictions are kept until :meth:`ShowWriter.finish`.
"""

from __future__ import annotations

import csv
import heapq
import io
import math
import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..atomic_files import atomic_write_bytes
from ..train.metrics import SegMetrics, row_normalized
from .visualize import class_palette, colorize_aux, confusion_image, make_eval_panel, save_png

__all__ = ["ShowWriter", "image_miou", "write_confusion_csv"]


class ShowWriter:
    """Writes the panels of ``gopt eval --show-dir`` into ``folder`` (created), then, at
    :meth:`finish`, the worst ones (with ``worst``) and the confusion files."""

    def __init__(self, folder: str | os.PathLike, dataset: Any, class_names: Sequence[str],
                 worst: int | None = None) -> None:
        if worst is not None and (isinstance(worst, bool) or not isinstance(worst, int) or worst < 1):
            raise ValueError(f"the number of worst images to show must be a positive integer, got {worst!r}")
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dataset, self.class_names, self.worst = dataset, list(class_names), worst
        self.palette = class_palette(len(self.class_names))
        self.panels: list[Path] = []  # written so far, in order
        self._kept: list[tuple[float, int, np.ndarray, np.ndarray]] = []  # heap of (-mIoU, -index, prediction, label)

    def __call__(self, index: int, prediction: torch.Tensor, label: torch.Tensor) -> None:
        """One evaluated image: ``prediction`` and ``label`` int64 ``[H, W]`` (any device)."""
        prediction, label = prediction.cpu(), label.cpu()
        miou = image_miou(prediction, label, len(self.class_names))
        if self.worst is None:
            self._write_panel(index, prediction.numpy(), label.numpy(), miou)
        elif not math.isnan(miou):
            item = (-miou, -index, prediction.numpy().astype(np.int32), label.numpy().astype(np.int32))
            if len(self._kept) < self.worst:
                heapq.heappush(self._kept, item)
            else:  # drops the best of the kept and the new one (of equal mIoU, the later image)
                heapq.heappushpop(self._kept, item)

    def finish(self, confusion: Sequence[Sequence[int]]) -> list[Path]:
        """Writes the kept worst panels (worst first) and ``confusion.csv`` / ``confusion.png``
        of ``confusion`` (``evaluate(...)["confusion"]``); returns the panels written."""
        for negative_miou, negative_index, prediction, label in sorted(self._kept, reverse=True):
            self._write_panel(-negative_index, prediction, label, -negative_miou)
        self._kept = []
        write_confusion_csv(self.folder / "confusion.csv", confusion, self.class_names)
        save_png(confusion_image(row_normalized(confusion).numpy(), self.class_names), self.folder / "confusion.png")
        return self.panels

    def _write_panel(self, index: int, prediction: np.ndarray, label: np.ndarray, miou: float) -> None:
        sample = self.dataset.load(index)  # before transforms: [0, 1] images at the label's size
        rgb = np.clip(np.rint(sample["rgb"].numpy().transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8)
        aux_colour, aux_range = colorize_aux(sample["aux"].numpy().mean(0))
        score = "no labelled pixel" if math.isnan(miou) else f"mIoU {100 * miou:.1f}"
        panel = make_eval_panel(rgb, aux_colour, prediction, label, self.class_names, self.palette,
                                titles=("RGB", "Auxiliary", f"Prediction ({score})", "Ground truth"),
                                aux_range=aux_range)
        path = self.folder / f"{sample['meta']['stem']}.png"
        save_png(panel, path)
        self.panels.append(path)


def image_miou(prediction: torch.Tensor, label: torch.Tensor, num_classes: int) -> float:
    """The mIoU of one image's prediction (:class:`~gopt_adapter.train.metrics.SegMetrics` over its
    pixels alone, label 255 ignored as in evaluation); ``nan`` when it has no labelled pixel."""
    metrics = SegMetrics(num_classes)
    metrics.update(prediction, label)
    return metrics.compute()["miou"]


def write_confusion_csv(path: str | os.PathLike, confusion: Sequence[Sequence[int]],
                        class_names: Sequence[str]) -> None:
    """``confusion`` row-normalised as CSV, atomically: a header ``ground truth \\ prediction,
    pixels, <class names>``, then one row per ground-truth class: its name, its pixel count and
    its shares (6 decimals; empty for a class without pixels)."""
    shares = row_normalized(confusion)  # [K, K]
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["ground truth \\ prediction", "pixels", *class_names])
    for name, counts, row in zip(class_names, confusion, shares.tolist()):
        writer.writerow([name, sum(counts), *("" if math.isnan(v) else f"{v:.6f}" for v in row)])
    atomic_write_bytes(path, buffer.getvalue().encode())
