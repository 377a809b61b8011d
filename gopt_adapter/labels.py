"""The label convention every reader, loss, metric and calibration shares."""

from __future__ import annotations

__all__ = ["IGNORE_INDEX"]

#: Label value of pixels that carry no class (unlabelled, padding, holes): never trained on,
#: never counted in a metric. The RGB-X codebases' 255.
IGNORE_INDEX = 255
