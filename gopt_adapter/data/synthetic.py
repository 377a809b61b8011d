"""A procedural RGB-X world in which the auxiliary modality is necessary, by construction.

Each scene is a domain-warped Voronoi partition of the canvas into 6-16 regions. Every
region draws its class independently and uniformly from the mode's class list, *after* the
geometry is drawn, so a class's expected pixel share is exactly ``1 / num_classes`` and a
region's shape, size and position say nothing about its class. A region is painted with
its class's RGB colour and auxiliary level plus bounded noise whose distribution is the same
for every class:

* RGB: colour + per-region brightness jitter (+-0.03) + smooth texture (+-0.02) + pixel
  noise (+-0.01), clipped to [0, 1]. Distinct colours are >= 0.3 apart in some channel, so
  they are separable pixel by pixel.
* aux: level + smooth field (+-0.04) + pixel noise (+-0.02) for depth and thermal; level
  times uniform speckle in [0.8, 1.2] for SAR; clipped to [0, 1].

Some classes share *exactly* the same colour and differ only in their aux level (a picture
flat on the wall vs a cabinet in front of it; a person vs a shadow in a dark night frame;
water vs farmland, city vs village in SAR). Given the RGB image, which member of such a
group a region belongs to is independent of everything the RGB image shows, so no RGB-only
predictor, however much context it uses, can do better than
:func:`rgb_only_miou_bound`. With RGB + aux every pixel is decodable and mIoU 1.0 is
reachable.

Worlds (``mode``), classes as ``name (aux level)``, groups of identical RGB in brackets:

* ``"depth"`` (indoor, aux = depth, 1 = far): wall (0.90), floor (0.60),
  [picture (0.85), cabinet (0.35)], [rug (0.60), table (0.20)], chair (0.30), lamp (0.50).
  RGB-only mIoU bound 2/3 = 0.6667.
* ``"thermal"`` (night street, aux = temperature): road (0.40), building (0.30),
  vegetation (0.25), [shadow (0.20), person (0.90)], car (0.75), cone (0.35).
  RGB-only bound 17/21 = 0.8095.
* ``"sar"`` (optical + SAR backscatter): [farmland (0.45), water (0.05)],
  [city (0.95), village (0.45)], forest (0.40), road (0.20). RGB-only bound 5/9 = 0.5556.

These three are the ``absolute`` family: a level reads the same in every image. The
``relative`` family (one world, ``"relative"``) records the same kind of scene as a real depth
sensor would, through :class:`RelativeSensor`: per image, a random gain and offset (so a level
means something only relative to the rest of its scene), smooth noise in cells one patch wide,
per-pixel noise, a misregistration of up to 2 pixels against RGB and labels, and blobs of
missing readings (0) over about 10% of the pixels, drawn independently of the classes. Its 20
classes come in 6 colours shared by 3 or 4 classes each, whose depths are ordered within the
colour, evenly spread over [0.2, 0.9]: only a region's depth relative to the scene tells them
apart. RGB-only bound (2 * 4/7 + 4 * 3/5) / 20 = 0.1771.

* ``"relative"`` (indoor, aux = depth up to a per-image gain and offset, 1 = far), near to far
  within each colour: [pillow, fridge, door, wall], [chair, table, cabinet, bookshelf],
  [plant, towel, picture], [bag, sofa, curtain], [clothes, bed, blinds], [books, lamp, window].

Samples are a deterministic function of ``(seed, split, index)`` (independent of worker
count and access order), generated on the fly; ``rgb`` and ``aux`` are in [0, 1], like
every reader in this package.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping, Sequence

import numpy as np
import torch

from ..labels import IGNORE_INDEX
from .base import SegDataset, Transform, check_choice

__all__ = [
    "FAMILIES",
    "RelativeSensor",
    "SyntheticClass",
    "SyntheticRGBX",
    "WORLDS",
    "rgb_groups",
    "world_family",
    "rgb_only_miou_bound",
]


@dataclass(frozen=True)
class SyntheticClass:
    """One class of a synthetic world: its name, RGB colour and auxiliary level."""

    name: str
    rgb: tuple[float, float, float]
    aux: float


_WHITE = (0.80, 0.75, 0.65)
_BROWN = (0.45, 0.30, 0.20)
_GREEN = (0.20, 0.60, 0.25)
_BLUE = (0.20, 0.30, 0.75)
_RED = (0.85, 0.20, 0.20)
_YELLOW = (0.95, 0.90, 0.30)
_BLACK = (0.05, 0.05, 0.06)
_FIELD = (0.35, 0.50, 0.30)
_GREY = (0.60, 0.60, 0.60)


def _near_to_far(rgb: tuple[float, float, float], *names: str) -> tuple[SyntheticClass, ...]:
    """Classes of one colour whose depths follow the order of ``names``, evenly spread over [0.2, 0.9]."""
    levels = np.linspace(0.2, 0.9, len(names))
    return tuple(SyntheticClass(name, rgb, float(level)) for name, level in zip(names, levels))


WORLDS: dict[str, tuple[SyntheticClass, ...]] = {
    "depth": (
        SyntheticClass("wall", _WHITE, 0.90),
        SyntheticClass("floor", _BROWN, 0.60),
        SyntheticClass("picture", _GREEN, 0.85),
        SyntheticClass("cabinet", _GREEN, 0.35),
        SyntheticClass("rug", _BLUE, 0.60),
        SyntheticClass("table", _BLUE, 0.20),
        SyntheticClass("chair", _RED, 0.30),
        SyntheticClass("lamp", _YELLOW, 0.50),
    ),
    "thermal": (
        SyntheticClass("road", (0.40, 0.40, 0.42), 0.40),
        SyntheticClass("building", (0.70, 0.20, 0.15), 0.30),
        SyntheticClass("vegetation", (0.10, 0.45, 0.10), 0.25),
        SyntheticClass("shadow", _BLACK, 0.20),
        SyntheticClass("person", _BLACK, 0.90),
        SyntheticClass("car", (0.75, 0.75, 0.80), 0.75),
        SyntheticClass("cone", (0.95, 0.60, 0.05), 0.35),
    ),
    "sar": (
        SyntheticClass("farmland", _FIELD, 0.45),
        SyntheticClass("water", _FIELD, 0.05),
        SyntheticClass("city", _GREY, 0.95),
        SyntheticClass("village", _GREY, 0.45),
        SyntheticClass("forest", (0.05, 0.20, 0.05), 0.40),
        SyntheticClass("road", (0.90, 0.90, 0.85), 0.20),
    ),
    "relative": (
        *_near_to_far(_WHITE, "pillow", "fridge", "door", "wall"),
        *_near_to_far(_BROWN, "chair", "table", "cabinet", "bookshelf"),
        *_near_to_far(_GREEN, "plant", "towel", "picture"),
        *_near_to_far(_BLUE, "bag", "sofa", "curtain"),
        *_near_to_far(_RED, "clothes", "bed", "blinds"),
        *_near_to_far(_YELLOW, "books", "lamp", "window"),
    ),
}
#: World families: how a world's aux image records its levels. ``absolute``: the level plus
#: bounded noise, the same reading in every image; ``relative``: through a :class:`RelativeSensor`.
FAMILIES: dict[str, tuple[str, ...]] = {"absolute": ("depth", "thermal", "sar"), "relative": ("relative",)}


def world_family(mode: str) -> str:
    """The family of the world ``mode`` (``ValueError`` for a name no family holds)."""
    check_choice("mode", mode, tuple(WORLDS))
    return next(family for family, worlds in FAMILIES.items() if mode in worlds)


@dataclass(frozen=True)
class RelativeSensor:
    """How the ``relative`` family's aux sensor records a scene's level map, per image.

    In order: the level map is shifted against RGB and labels by a whole number of pixels in
    ``[-max_shift, max_shift]`` along each axis (misregistration; edges repeated); scaled by a
    gain uniform in ``gain`` and lifted by an offset uniform in ``[0, 1 - gain]`` (so a level
    reads differently in every image, and only its place among the scene's levels counts);
    smooth noise of half-width ``noise`` on cells ``noise_cell`` pixels wide (one ViT patch:
    a patch's own reading is off by an amount its neighbours share) and per-pixel noise of
    half-width ``pixel_noise`` are added; the result is clipped to [0, 1]. Last, blobs of a
    smooth field on cells ``hole_cell`` pixels wide become holes of 0 (no reading) over a share
    of the pixels uniform in ``[hole_fraction / 2, 3 * hole_fraction / 2]``: like a depth
    sensor's missing returns, but independent of the classes, so the holes tell nothing.
    """

    gain: tuple[float, float] = (0.4, 1.0)
    noise: float = 0.04
    noise_cell: int = 8
    pixel_noise: float = 0.02
    hole_fraction: float = 0.1
    hole_cell: int = 16
    max_shift: int = 2

    def __post_init__(self) -> None:
        gain = tuple(float(v) for v in self.gain)
        if len(gain) != 2 or not 0 < gain[0] <= gain[1] <= 1:
            raise ValueError(f"gain must be (low, high) with 0 < low <= high <= 1, got {self.gain}")
        if self.noise < 0 or self.pixel_noise < 0:
            raise ValueError(f"noise and pixel_noise must be >= 0, got {self.noise}, {self.pixel_noise}")
        if not 0 <= self.hole_fraction <= 2 / 3:
            raise ValueError(f"hole_fraction must be in [0, 2/3] (the share varies up to 1.5 times it), "
                             f"got {self.hole_fraction}")
        for name in ("noise_cell", "hole_cell"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if not isinstance(self.max_shift, int) or self.max_shift < 0:
            raise ValueError(f"max_shift must be a non-negative integer, got {self.max_shift!r}")
        object.__setattr__(self, "gain", gain)

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
# Noise amplitudes (half-widths of uniform distributions); see the module docstring.
_REGION_JITTER, _RGB_TEXTURE, _RGB_PIXEL = 0.03, 0.02, 0.01
_AUX_FIELD, _AUX_PIXEL = 0.04, 0.02
_SPECKLE = 0.2


def rgb_groups(classes: Sequence[SyntheticClass]) -> list[tuple[int, ...]]:
    """Partition class indices into groups of identical RGB colour (in first-seen order)."""
    groups: dict[tuple[float, float, float], list[int]] = {}
    for idx, cls in enumerate(classes):
        groups.setdefault(cls.rgb, []).append(idx)
    return [tuple(g) for g in groups.values()]


def rgb_only_miou_bound(class_probs: Sequence[float], groups: Sequence[Sequence[int]]) -> float:
    """Best mIoU of any predictor that cannot tell apart the classes within each group.

    Setting: class ``c`` covers a fraction ``pi_c`` of the pixels; within a group ``G``
    (classes that look identical in the predictor's input) the true class of a pixel is
    independent of that input, so a predictor can only choose, for the group's pixels, the
    fractions ``q_c`` it labels as each member. In the many-pixel limit (confusion matrix
    of expectations) with ``p_c = pi_c / pi_G``::

        IoU_c = q_c p_c / (p_c + q_c (1 - p_c))

    Labelling group pixels outside the group, or non-group pixels inside it, only adds
    errors, so each group is optimised alone subject to ``sum q_c = 1``. ``IoU_c`` is
    concave in ``q_c`` and the KKT conditions give the closed form
    ``q_c ∝ p_c / (1 - p_c)``; a singleton group reaches IoU 1. For ``k`` equally likely
    members this is ``q_c = 1 / k`` and the group's IoUs sum to ``k / (2k - 1)`` (e.g. two
    classes: 1/3 each, better than the 1/2 + 0 of always answering one of them).

    Returns the mean IoU over all classes of that optimum.
    """
    probs = np.asarray(class_probs, dtype=np.float64)
    if probs.ndim != 1 or (probs <= 0).any():
        raise ValueError(f"class_probs must be positive, got {class_probs}")
    seen = sorted(i for g in groups for i in g)
    if seen != list(range(len(probs))):
        raise ValueError(f"groups {groups} must partition the {len(probs)} classes")
    total = 0.0
    for group in groups:
        p = probs[list(group)] / probs[list(group)].sum()
        if len(group) == 1:
            total += 1.0
            continue
        weights = p / (1.0 - p)
        q = weights / weights.sum()
        total += float((q * p / (p + q * (1.0 - p))).sum())
    return total / len(probs)


def _bilinear_weights(cells: int, size: int) -> np.ndarray:
    """``[size, cells + 1]`` weights that upsample a coarse grid bilinearly (corners aligned)."""
    pos = np.linspace(0.0, cells, size)
    lo = np.minimum(pos.astype(np.int64), cells - 1)
    frac = pos - lo
    weights = np.zeros((size, cells + 1), dtype=np.float32)
    weights[np.arange(size), lo] = 1.0 - frac
    weights[np.arange(size), lo + 1] = frac
    return weights


def _smooth_noise(rng: np.random.Generator, channels: int, weights: np.ndarray) -> np.ndarray:
    """Uniform [-1, 1] noise on a coarse grid, bilinearly upsampled: ``[channels, S, S]``."""
    cells = weights.shape[1]
    coarse = rng.random((channels, cells, cells), dtype=np.float32) * 2 - 1
    return weights @ coarse @ weights.T


def _uniform(rng: np.random.Generator, shape: Sequence[int] | int, half_width: float) -> np.ndarray:
    return (rng.random(shape, dtype=np.float32) * 2 - 1) * np.float32(half_width)


class SyntheticRGBX(SegDataset):
    """The synthetic RGB-X world as a dataset (no files; samples are generated on access).

    Args:
        mode: ``"depth"``, ``"thermal"``, ``"sar"`` (the absolute family) or ``"relative"``
            (see the module docstring).
        split: ``"train"``, ``"val"`` or ``"test"``: independent streams of scenes.
        size: side of the square images (default 128).
        length: number of samples in the split (default 1000).
        seed: world seed; sample ``i`` depends only on ``(seed, split, i)``.
        min_regions, max_regions: range of the number of Voronoi regions per scene.
        transform: joint transform applied to each sample.
        cache: keep every generated scene in memory (before the transform), for runs that
            read a small split many times; samples are deterministic, so nothing changes but
            the speed (and about ``5 * size**2 * 4`` bytes per scene).
        sensor: the relative family's :class:`RelativeSensor`, or a mapping of its fields (as a
            settings file gives it); default ``RelativeSensor()``. Refused for the absolute family.

    Attributes:
        classes: the :class:`SyntheticClass` list of the mode.
        family: ``"absolute"`` or ``"relative"`` (:data:`FAMILIES`).
        sensor: the :class:`RelativeSensor` of a relative world, ``None`` for an absolute one.
        class_names, num_classes, aux_channels (1), ignore_index (255, never present).
        groups: class indices grouped by identical RGB colour.
        aux_dependent_classes: classes that share their RGB colour with another class and
            so can only be recognised with the aux channel.
        rgb_only_miou_bound: :func:`rgb_only_miou_bound` for this world (uniform classes).
    """

    name = "synthetic"
    aux_channels = 1
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        mode: Literal["depth", "thermal", "sar", "relative"] = "depth",
        split: str = "train",
        *,
        size: int = 128,
        length: int = 1000,
        seed: int = 0,
        min_regions: int = 6,
        max_regions: int = 16,
        transform: Transform | None = None,
        cache: bool = False,
        sensor: RelativeSensor | Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(transform)
        self.family = world_family(mode)
        check_choice("split", split, tuple(_SPLIT_CODES))
        if size < 8:
            raise ValueError(f"size must be >= 8, got {size}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        if not 1 <= min_regions <= max_regions:
            raise ValueError(f"need 1 <= min_regions <= max_regions, got {min_regions}, {max_regions}")
        self.mode = mode
        self.split = split
        self.size = int(size)
        self.length = int(length)
        self.seed = int(seed)
        self.min_regions, self.max_regions = int(min_regions), int(max_regions)
        if sensor is not None and self.family != "relative":
            raise ValueError(f"sensor applies to the relative family only; mode {mode!r} is {self.family}")
        if self.family == "relative":
            self.sensor = sensor if isinstance(sensor, RelativeSensor) else RelativeSensor(**(sensor or {}))
        else:
            self.sensor = None
        self.classes = WORLDS[mode]
        self.class_names = tuple(c.name for c in self.classes)
        self.groups = rgb_groups(self.classes)
        self.aux_dependent_classes = frozenset(i for g in self.groups if len(g) > 1 for i in g)
        self.rgb_only_miou_bound = rgb_only_miou_bound([1.0] * self.num_classes, self.groups)
        self._rgb_table = np.array([c.rgb for c in self.classes], dtype=np.float32)  # [K, 3]
        self._aux_table = np.array([c.aux for c in self.classes], dtype=np.float32)  # [K]
        centres = np.arange(self.size, dtype=np.float32) + 0.5
        self._grid = np.stack(np.meshgrid(centres, centres, indexing="ij"))  # [2, S, S] (y, x)
        cells = {3, 4, 8}
        if self.sensor is not None:
            cells |= {self._cells(self.sensor.noise_cell), self._cells(self.sensor.hole_cell)}
        self._weights = {n: _bilinear_weights(n, self.size) for n in cells}
        self._cache: dict[int, dict[str, Any]] | None = {} if cache else None

    def __len__(self) -> int:
        return self.length

    def sample_seed(self, index: int) -> int:
        """The generator seed of sample ``index``: a hash of (seed, split, index)."""
        state = np.random.SeedSequence([self.seed, _SPLIT_CODES[self.split], int(index)]).generate_state(2)
        return int(state[0]) << 32 | int(state[1])

    def load(self, index: int) -> dict[str, Any]:
        if self._cache is None:
            return self.generate(index)
        if index not in self._cache:
            self._cache[index] = self.generate(index)
        return {**self._cache[index]}  # transforms build new tensors; the dict itself is the caller's

    def generate(self, index: int) -> dict[str, Any]:
        """Scene ``index``, computed from its seed (what :meth:`load` returns uncached)."""
        # numpy, not torch: generation is single-threaded by design, so it neither competes
        # with the training loop's intra-op threads nor slows down under CPU contention.
        rng = np.random.default_rng(self.sample_seed(index))
        s = self.size
        n = int(rng.integers(self.min_regions, self.max_regions + 1))
        centres = rng.random((n, 2), dtype=np.float32) * s  # [n, 2]
        coords = self._grid + _smooth_noise(rng, 2, self._weights[3]) * np.float32(0.2 * s)  # [2, S, S], warped
        dist = ((coords[None] - centres[:, :, None, None]) ** 2).sum(1)  # [n, S, S]
        region = dist.argmin(0)  # [S, S]
        # Classes are drawn after (and independently of) the geometry.
        region_class = rng.integers(0, self.num_classes, n)  # [n]
        label = region_class[region]  # [S, S] int64

        rgb = self._rgb_table[label].transpose(2, 0, 1)  # [3, S, S]
        rgb = (rgb + _uniform(rng, n, _REGION_JITTER)[region]
               + _smooth_noise(rng, 3, self._weights[8]) * np.float32(_RGB_TEXTURE)
               + _uniform(rng, (3, s, s), _RGB_PIXEL))
        level = self._aux_table[label][None]  # [1, S, S]
        if self.sensor is not None:
            aux = self._record(rng, level)
        elif self.mode == "sar":
            aux = level * (1 + _uniform(rng, (1, s, s), _SPECKLE))
        else:
            aux = (level + _smooth_noise(rng, 1, self._weights[4]) * np.float32(_AUX_FIELD)
                   + _uniform(rng, (1, s, s), _AUX_PIXEL))
        return {
            "rgb": torch.from_numpy(np.clip(rgb, 0.0, 1.0, out=rgb)),  # [3, S, S] in [0, 1]
            "aux": torch.from_numpy(np.clip(aux, 0.0, 1.0, out=aux)),  # [1, S, S] in [0, 1]
            "label": torch.from_numpy(label.astype(np.int64)),  # [S, S]
            "meta": {"stem": f"synthetic_{self.mode}_{self.split}_{index:06d}", "size": (s, s)},
        }

    def _cells(self, width: int) -> int:
        """Cells of a smooth field whose cells are about ``width`` pixels wide."""
        return max(1, round(self.size / width))

    def _record(self, rng: np.random.Generator, level: np.ndarray) -> np.ndarray:
        """What the :class:`RelativeSensor` records of the level map ``[1, S, S]``, before the
        clip to [0, 1] that :meth:`generate` applies to every world (it leaves the holes at 0)."""
        sensor, s, m = self.sensor, self.size, self.sensor.max_shift
        dy, dx = rng.integers(-m, m + 1, 2)
        level = np.pad(level, ((0, 0), (m, m), (m, m)), mode="edge")[:, m + dy:m + dy + s, m + dx:m + dx + s]
        gain = rng.uniform(*sensor.gain)
        offset = rng.uniform(0.0, 1.0 - gain)
        aux = (np.float32(gain) * level + np.float32(offset)  # [1, S, S], misregistered
               + _smooth_noise(rng, 1, self._weights[self._cells(sensor.noise_cell)]) * np.float32(sensor.noise)
               + _uniform(rng, (1, s, s), sensor.pixel_noise))
        field = _smooth_noise(rng, 1, self._weights[self._cells(sensor.hole_cell)]).reshape(-1)  # [S*S]
        holes = round(rng.uniform(0.5, 1.5) * sensor.hole_fraction * field.size)
        aux.reshape(-1)[np.argsort(field)[field.size - holes:]] = 0.0  # the field's highest pixels: blobs
        return aux

    def __repr__(self) -> str:
        return (f"SyntheticRGBX(mode={self.mode!r}, split={self.split!r}, size={self.size}, "
                f"length={self.length}, seed={self.seed}, rgb_only_miou_bound={self.rgb_only_miou_bound:.4f})")
