"""Colour maps and figure panels for predictions (pillow only, no matplotlib).

* Classes: the Pascal-VOC bit-interleaved palette (:func:`class_palette`): class 0 is black,
  1 dark red, 2 dark green, 3 olive, ... every class id gets a fixed, distinct colour, so the
  same class has the same colour in every figure.
* Auxiliary images: 256-entry tables linearly interpolated in RGB between nine anchor
  colours sampled at 0, 1/8, ..., 1 from matplotlib's perceptually uniform ``viridis``
  (depth, SAR, default) and ``inferno`` (thermal) maps, plus ``gray``
  (:data:`COLORMAPS`). Values are stretched between the 1st and 99th percentile of the
  valid pixels; pixels without a reading (0 in an integer depth/thermal image) are drawn black.
* :func:`make_panel` draws a figure like the paper's Figure 5: RGB | auxiliary (colour
  mapped, with a colour bar) | prediction overlaid on the RGB image, each pane with a small
  title, and a legend of colour swatches and class names underneath (``gopt predict``).
* :func:`make_eval_panel` draws RGB | auxiliary | prediction | ground truth, the label maps in
  plain palette colours, wrong pixels hatched white, ignored ones in VOC's void colour; and
  :func:`confusion_image` a row-normalised confusion matrix (``gopt eval --show-dir``).
* :func:`save_png` writes any of them atomically.
"""

from __future__ import annotations

import io
import math
import os
from functools import lru_cache
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ..atomic_files import atomic_write_bytes

__all__ = [
    "COLORMAPS",
    "class_palette",
    "colormap",
    "colorize_aux",
    "colorize_labels",
    "overlay_labels",
    "make_panel",
    "WRONG_COLOUR",
    "VOID_COLOUR",
    "mark_wrong",
    "colorize_truth",
    "make_eval_panel",
    "display_zoom",
    "confusion_image",
    "save_png",
]

_VIRIDIS = ((68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 145, 140),
            (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37))
_INFERNO = ((0, 0, 4), (31, 12, 72), (85, 15, 109), (136, 34, 106), (186, 54, 85),
            (227, 89, 51), (249, 140, 10), (249, 201, 50), (252, 255, 164))
_GRAY = ((0, 0, 0), (255, 255, 255))

#: Anchor colours of the auxiliary colour maps (evenly spaced from low to high values).
COLORMAPS: dict[str, tuple[tuple[int, int, int], ...]] = {"viridis": _VIRIDIS, "inferno": _INFERNO, "gray": _GRAY}

#: Wrong pixels of an evaluation panel's prediction (:func:`mark_wrong`): no class of
#: :func:`class_palette` has it (its red channel never exceeds 224).
WRONG_COLOUR = (255, 255, 255)
#: Ignored ground-truth pixels (label 255): Pascal VOC's "void", ``class_palette(256)[255]``.
VOID_COLOUR = (224, 224, 192)
#: Evaluation panes narrower than this are enlarged by a whole factor (:func:`display_zoom`), so
#: that titles such as "Prediction (mIoU 43.1)" fit above them.
MIN_PANE_WIDTH = 160


def class_palette(num_classes: int) -> np.ndarray:
    """Pascal-VOC palette: ``uint8 [num_classes, 3]``; bits of the class id interleaved into R, G, B."""
    palette = np.zeros((num_classes, 3), dtype=np.uint8)
    for cls in range(num_classes):
        value, r, g, b = cls, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (value & 1) << shift
            g |= ((value >> 1) & 1) << shift
            b |= ((value >> 2) & 1) << shift
            value >>= 3
        palette[cls] = (r, g, b)
    return palette


@lru_cache(maxsize=None)
def colormap(name: str) -> np.ndarray:
    """The 256-entry ``uint8 [256, 3]`` table of colour map ``name`` (see :data:`COLORMAPS`)."""
    if name not in COLORMAPS:
        raise ValueError(f"unknown colour map {name!r}; choose one of {sorted(COLORMAPS)}")
    anchors = np.asarray(COLORMAPS[name], dtype=np.float64)  # [A, 3]
    positions = np.linspace(0.0, 1.0, len(anchors))
    x = np.linspace(0.0, 1.0, 256)
    table = np.stack([np.interp(x, positions, anchors[:, c]) for c in range(3)], axis=1)
    table = np.rint(table).astype(np.uint8)
    table.flags.writeable = False
    return table


def colorize_aux(aux: np.ndarray, valid: np.ndarray | None = None, cmap: str = "viridis",
                 percentiles: tuple[float, float] = (1.0, 99.0)) -> tuple[np.ndarray, tuple[float, float]]:
    """Colour-maps a single-channel image ``[H, W]``; returns ``(uint8 [H, W, 3], (low, high))``.

    Values are stretched between the given percentiles of the valid pixels (the returned
    range, in the input's units); invalid pixels are black.
    """
    aux = np.asarray(aux, dtype=np.float64)
    if aux.ndim == 3:
        aux = aux.mean(axis=2)
    valid = np.isfinite(aux) if valid is None else (valid & np.isfinite(aux))
    if valid.any():
        low, high = (float(v) for v in np.percentile(aux[valid], percentiles))
    else:
        low, high = 0.0, 1.0
    scaled = (aux - low) / (high - low) if high > low else np.zeros_like(aux)
    index = np.rint(np.clip(np.nan_to_num(scaled), 0.0, 1.0) * 255).astype(np.uint8)
    out = colormap(cmap)[index]  # [H, W, 3]
    out[~valid] = 0
    return out, (low, high)


def colorize_labels(label: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``uint8 [H, W, 3]`` image of a label map (ids index ``palette``)."""
    return palette[np.asarray(label)]


def _boundaries(label: np.ndarray) -> np.ndarray:
    edge = np.zeros(label.shape, dtype=bool)
    edge[:, 1:] |= label[:, 1:] != label[:, :-1]
    edge[1:, :] |= label[1:, :] != label[:-1, :]
    return edge


def overlay_labels(rgb: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.6,
                   boundaries: bool = True) -> np.ndarray:
    """The RGB image blended with the class colours (``alpha`` = weight of the colours);
    region boundaries drawn in white."""
    colours = colorize_labels(label, palette).astype(np.float32)
    out = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colours
    out = np.clip(np.rint(out), 0, 255).astype(np.uint8)
    if boundaries:
        out[_boundaries(label)] = 255
    return out


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # pillow < 10.1: one fixed-size bitmap font
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _format_value(value: float) -> str:
    if abs(value) >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.3g}"


def _legend_classes(legend: str, labels: Sequence[np.ndarray], num_classes: int) -> list[int]:
    """Class ids of a legend: ``"present"``, those in ``labels`` (largest share first), or ``"all"``."""
    if legend == "all":
        return list(range(num_classes))
    if legend != "present":
        raise ValueError(f"legend must be 'present' or 'all', got {legend!r}")
    values = np.concatenate([np.asarray(label).ravel() for label in labels])
    ids, counts = np.unique(values[(values >= 0) & (values < num_classes)], return_counts=True)
    return [int(i) for i in ids[np.argsort(-counts, kind="stable")]]


def _compose(panes: Sequence[np.ndarray], titles: Sequence[str], entries: Sequence[tuple[Sequence[int], str]],
             aux_range: tuple[float, float] | None, aux_cmap: str) -> Image.Image:
    """``uint8 [H, W, 3]`` panes side by side with their titles above, the colour bar of
    ``aux_range`` under the second pane (the auxiliary image) and a legend of ``(colour, name)``
    swatches flowed underneath."""
    height, width = panes[0].shape[:2]
    font_size = int(np.clip(round(width / 26), 11, 22))
    font, small = _font(font_size), _font(max(9, round(font_size * 0.85)))
    gap = max(6, font_size // 2)
    margin = gap
    title_h = round(font_size * 1.6)
    bar_h = max(6, font_size // 2) if aux_range is not None else 0
    bar_block = bar_h + round(font_size * 1.5) if aux_range is not None else 0
    panel_w = 2 * margin + len(panes) * width + (len(panes) - 1) * gap

    # legend entries and their flowed layout
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    swatch = font_size
    row_h = round(font_size * 1.5)
    rows: list[list[tuple[int, int]]] = [[]]
    x = margin
    for entry, (_, name) in enumerate(entries):
        item_w = swatch + gap // 2 + _text_size(scratch, name, font)[0] + 2 * gap
        if rows[-1] and x + item_w > panel_w - margin:
            rows.append([])
            x = margin
        rows[-1].append((entry, x))
        x += item_w
    legend_h = row_h * len(rows) + gap if entries else 0

    panel_h = margin + title_h + height + bar_block + gap + legend_h + margin
    panel = Image.new("RGB", (panel_w, panel_h), "white")
    draw = ImageDraw.Draw(panel)
    top = margin + title_h
    for i, (pane, title) in enumerate(zip(panes, titles)):
        left = margin + i * (width + gap)
        panel.paste(Image.fromarray(pane), (left, top))
        tw, th = _text_size(draw, title, font)
        draw.text((left + (width - tw) // 2, margin + (title_h - th) // 2), title, fill="black", font=font,
                  anchor="lt")
        draw.rectangle((left - 1, top - 1, left + width, top + height), outline=(160, 160, 160))

    y = top + height + gap
    if aux_range is not None:  # colour bar under the auxiliary pane, value range at its ends
        left = margin + width + gap
        bar_w = width * 2 // 3
        bar_left = left + (width - bar_w) // 2
        ramp = np.broadcast_to(colormap(aux_cmap)[np.linspace(0, 255, bar_w).round().astype(int)][None],
                               (bar_h, bar_w, 3))
        panel.paste(Image.fromarray(np.ascontiguousarray(ramp)), (bar_left, y))
        draw.rectangle((bar_left - 1, y - 1, bar_left + bar_w, y + bar_h), outline=(120, 120, 120))
        low, high = (_format_value(v) for v in aux_range)
        draw.text((bar_left - gap // 2, y + bar_h // 2), low, fill=(60, 60, 60), font=small, anchor="rm")
        draw.text((bar_left + bar_w + gap // 2, y + bar_h // 2), high, fill=(60, 60, 60), font=small, anchor="lm")
        y += bar_block

    if entries:  # legend: a light rule, then swatch + name per entry
        draw.line((margin, y, panel_w - margin, y), fill=(210, 210, 210))
        y += gap
        for row in rows:
            for entry, x in row:
                colour, name = entries[entry]
                draw.rectangle((x, y, x + swatch - 1, y + swatch - 1), fill=tuple(int(c) for c in colour),
                               outline=(90, 90, 90))
                draw.text((x + swatch + gap // 2, y + swatch // 2), name, fill="black", font=font, anchor="lm")
            y += row_h
    return panel


def make_panel(rgb: np.ndarray, aux_colour: np.ndarray, label: np.ndarray, class_names: Sequence[str],
               palette: np.ndarray | None = None, titles: Sequence[str] = ("RGB", "Auxiliary", "Prediction"),
               aux_range: tuple[float, float] | None = None, aux_cmap: str = "viridis",
               legend: str = "present", alpha: float = 0.6) -> Image.Image:
    """RGB | auxiliary | prediction overlay, with titles, a colour bar and a class legend.

    Args:
        rgb: ``uint8 [H, W, 3]``; aux_colour: ``uint8 [H, W, 3]`` (from :func:`colorize_aux`);
        label: ``[H, W]`` class ids; class_names: one name per class.
        aux_range: the ``(low, high)`` values at the ends of the colour bar (no bar if None).
        legend: ``"present"`` lists the classes in the prediction (largest share first),
            ``"all"`` every class in id order.
    """
    palette = class_palette(len(class_names)) if palette is None else palette
    entries = [(palette[cls], class_names[cls]) for cls in _legend_classes(legend, [label], len(class_names))]
    panes = [rgb, aux_colour, overlay_labels(rgb, label, palette, alpha)]
    return _compose(panes, titles, entries, aux_range, aux_cmap)


def _ignored(truth: np.ndarray, num_classes: int) -> np.ndarray:
    """Ground-truth pixels that are no class id (the ignore value 255): bool ``[H, W]``."""
    truth = np.asarray(truth)
    return (truth < 0) | (truth >= num_classes)


def mark_wrong(prediction: np.ndarray, truth: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """The prediction ``[H, W]`` in the palette's colours, ``uint8 [H, W, 3]``, its wrong pixels
    (ground truth another class id; ignored pixels are never wrong) hatched in
    :data:`WRONG_COLOUR`: diagonal stripes two pixels wide every four pixels, so that the
    predicted class still shows between them."""
    prediction, truth = np.asarray(prediction), np.asarray(truth)
    out = colorize_labels(prediction, palette)  # a new array: fancy indexing copies
    rows, cols = np.indices(prediction.shape)
    wrong = ~_ignored(truth, len(palette)) & (prediction != truth)
    out[wrong & ((rows + cols) % 4 < 2)] = WRONG_COLOUR
    return out


def colorize_truth(truth: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """A ground-truth map ``[H, W]`` in the palette's colours, ``uint8 [H, W, 3]``, its ignored
    pixels (values outside the palette's class ids, e.g. 255) in :data:`VOID_COLOUR`."""
    ignored = _ignored(truth, len(palette))
    out = colorize_labels(np.where(ignored, 0, truth), palette)
    out[ignored] = VOID_COLOUR
    return out


def make_eval_panel(rgb: np.ndarray, aux_colour: np.ndarray, prediction: np.ndarray, truth: np.ndarray,
                    class_names: Sequence[str], palette: np.ndarray | None = None,
                    titles: Sequence[str] = ("RGB", "Auxiliary", "Prediction", "Ground truth"),
                    aux_range: tuple[float, float] | None = None, aux_cmap: str = "viridis",
                    legend: str = "present") -> Image.Image:
    """RGB | auxiliary | prediction | ground truth, both label maps in the palette's colours:
    the prediction's wrong pixels hatched (:func:`mark_wrong`), the ground truth's ignored
    pixels in VOC's void colour (:func:`colorize_truth`); small images enlarged
    (:func:`display_zoom`). The legend lists the classes of both maps (``"present"``, largest
    share first) or every class (``"all"``), then the wrong and ignored swatches where there are
    such pixels."""
    num_classes = len(class_names)
    palette = class_palette(num_classes) if palette is None else palette
    zoom = display_zoom(np.asarray(truth).shape[1])
    ignored = _ignored(truth, num_classes)
    entries = [(palette[cls], class_names[cls])
               for cls in _legend_classes(legend, [prediction, np.asarray(truth)[~ignored]], num_classes)]
    if (~ignored & (np.asarray(prediction) != np.asarray(truth))).any():
        entries.append((WRONG_COLOUR, "wrong (hatched)"))
    if ignored.any():
        entries.append((VOID_COLOUR, "ignored"))
    panes = [rgb, aux_colour, mark_wrong(prediction, truth, palette), colorize_truth(truth, palette)]
    panes = [pane.repeat(zoom, axis=0).repeat(zoom, axis=1) for pane in panes]  # [zoom H, zoom W, 3]
    return _compose(panes, titles, entries, aux_range, aux_cmap)


def display_zoom(width: int) -> int:
    """The whole factor by which :func:`make_eval_panel` enlarges panes ``width`` pixels wide
    (nearest neighbour: each pixel a square block): 1 from :data:`MIN_PANE_WIDTH` up."""
    return max(1, math.ceil(MIN_PANE_WIDTH / width))


def confusion_image(shares: np.ndarray, class_names: Sequence[str]) -> Image.Image:
    """A row-normalised confusion matrix (float ``[K, K]``, rows ground truth, ``nan`` rows for
    classes without pixels; :func:`gopt_adapter.train.metrics.row_normalized`) as a heat map: each
    cell in viridis by its share, its percentage written in it where it fits, rows without
    pixels grey, the class names along both axes."""
    shares = np.asarray(shares, dtype=np.float64)
    k = len(class_names)
    cell = int(np.clip(720 // max(k, 1), 12, 48))
    font, small = _font(14), _font(max(8, cell // 3))
    gap = 8
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    name_w = max(_text_size(scratch, name, font)[0] for name in class_names)
    title = "confusion: rows ground truth, columns prediction, % of each row's pixels"
    title_h = _text_size(scratch, title, font)[1] + 2 * gap
    left, top = gap + name_w + gap, title_h + name_w + gap  # the grid's corner
    width = max(left + k * cell + gap, 2 * gap + _text_size(scratch, title, font)[0])
    image = Image.new("RGB", (width, top + k * cell + gap), "white")
    draw = ImageDraw.Draw(image)
    draw.text((gap, gap), title, fill="black", font=font, anchor="lt")
    table = colormap("viridis")
    for i, name in enumerate(class_names):
        y = top + i * cell
        draw.text((left - gap, y + cell // 2), name, fill="black", font=font, anchor="rm")
        label = Image.new("L", _text_size(scratch, name, font), 0)  # column name, drawn then turned upright
        ImageDraw.Draw(label).text((0, 0), name, fill=255, font=font, anchor="lt")
        label = label.rotate(90, expand=True)
        image.paste((0, 0, 0), (left + i * cell + (cell - label.width) // 2, top - gap - label.height), label)
        for j in range(k):
            x, share = left + j * cell, shares[i, j]
            colour = (200, 200, 200) if np.isnan(share) else tuple(int(c) for c in table[int(round(share * 255))])
            draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=colour, outline=(255, 255, 255))
            if not np.isnan(share) and cell >= 20:
                ink = "black" if share >= 0.5 else "white"  # viridis is light above the middle
                draw.text((x + cell // 2, y + cell // 2), f"{100 * share:.0f}", fill=ink, font=small, anchor="mm")
    return image


def save_png(image: Image.Image, path: str | os.PathLike) -> None:
    """Writes ``image`` as a PNG file, atomically (:func:`gopt_adapter.atomic_files.atomic_write_bytes`)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())
