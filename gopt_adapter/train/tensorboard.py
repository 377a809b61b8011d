"""TensorBoard logging of a training run (``train.logger="tensorboard"``, the ``tb`` extra).

Beside the JSONL log, which stays as it is, the main process writes TensorBoard event files to
``<out>/tensorboard``: per logged step the loss, the learning rate, images/s and the count of
skipped non-finite steps (``train/...``); per evaluation every scalar metric and each class's IoU
(``eval/...``, ``eval/iou/<class>``); once, the run's settings as text (``settings``). A run
that is resumed appends to the same folder; TensorBoard shows the later points of a step.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["TENSORBOARD_FOLDER", "TensorBoardLog", "check_tensorboard"]

TENSORBOARD_FOLDER = "tensorboard"
_TRAIN_SCALARS = ("loss", "lr", "images_per_s", "nonfinite_steps")


def check_tensorboard() -> None:
    """Raises ``ValueError`` naming the extra when the ``tensorboard`` package is missing."""
    if importlib.util.find_spec("tensorboard") is None:
        raise ValueError("logger 'tensorboard' needs the tensorboard package: pip install 'gopt-adapter[tb]'")


class TensorBoardLog:
    """Event files of one run in ``folder`` (written by the main process only)."""

    def __init__(self, folder: str | Path) -> None:
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(folder))

    def settings(self, settings: dict[str, Any]) -> None:
        self.writer.add_text("settings", "```\n" + json.dumps(settings, indent=2, default=str) + "\n```", 0)

    def record(self, record: dict[str, Any]) -> None:
        """A JSONL log record: the ``train`` ones become ``train/<name>`` scalars at their step."""
        if record.get("event") != "train":
            return
        for name in _TRAIN_SCALARS:
            value = record.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(f"train/{name}", value, record["step"])

    def evaluation(self, metrics: dict[str, Any], step: int, class_names: Sequence[str] | None = None) -> None:
        """Every finite scalar metric as ``eval/<name>``, each class's IoU as ``eval/iou/<class>``."""
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                self.writer.add_scalar(f"eval/{name}", value, step)
        for index, value in enumerate(metrics.get("iou", [])):
            if isinstance(value, (int, float)) and math.isfinite(value):
                name = class_names[index] if class_names and index < len(class_names) else str(index)
                self.writer.add_scalar(f"eval/iou/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
