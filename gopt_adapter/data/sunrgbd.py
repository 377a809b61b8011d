"""SUN RGB-D (RGB-D indoor scenes, 37 classes).

Read exactly like NYUDv2 (same depth rules and label shift: raw 0 -> 255, raw k -> k - 1)
with three differences in the layout: the folder is ``SUNRGBD``, labels live in the
lower-case ``labels/`` folder, and there are 37 classes (the first 37 of NYUDv2's list).
Image sizes vary by sensor (about 530x730); samples are returned at their own size.

Layout under ``root``::

    RGB/<stem>.jpg, Depth/<stem>.png, labels/<stem>.png, train.txt, test.txt
"""

from __future__ import annotations

from .nyudv2 import NYUDV2_CLASSES, NYUDv2

__all__ = ["SUNRGBD", "SUNRGBD_CLASSES"]

SUNRGBD_CLASSES: tuple[str, ...] = NYUDV2_CLASSES[:37]


class SUNRGBD(NYUDv2):
    """SUN RGB-D reader; arguments as :class:`~gopt_adapter.data.nyudv2.NYUDv2`.

    Splits: ``"train"`` (5285) and ``"test"`` (5050).
    """

    name = "sunrgbd"
    dataset_folder = "SUNRGBD"
    label_folder = "labels"
    class_names = SUNRGBD_CLASSES
    expected_sizes = {"train": 5285, "test": 5050}
