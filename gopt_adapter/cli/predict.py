"""Running a saved adapter on real image pairs: reading, normalising, predicting, writing.

What ``gopt predict`` does with one RGB + auxiliary pair:

1. Reads both files with :func:`gopt_adapter.data.base.read_image` (PNG, JPEG, TIFF;
   8- or 16-bit). RGB: 3 channels (a 4th, alpha, is dropped), divided by the dtype maximum.
   A 4-channel MFNet PNG (R, G, B, thermal) given alone, or as both inputs, is split
   into RGB + thermal; a 3-channel image given alone is RGB without aux, run in the
   adapter's aux-missing mode (adapters trained with ``aux_dropout > 0``).
2. Scales the auxiliary image to [0, 1] like the dataset readers: ``"fixed"`` (default)
   divides by ``aux_max`` (default: the dtype maximum, 255 for 8-bit, 65535 for 16-bit;
   10000 for millimetre depth read as the NYUDv2 / SUN RGB-D readers do) and clips;
   ``"per_image"`` min-max scales each image.
3. Resizes both by the adapter's ``image_scale`` (when it is not 1: bilinear, antialiased
   when shrinking, as training's :class:`~gopt_adapter.preprocessing.ScaleImage`), then
   normalises with a :class:`~gopt_adapter.preprocessing.NormalizeConfig` (by default the
   training default: ImageNet mean/std for RGB, 0.5/0.5 for aux).
4. Pads the normalised images at the bottom/right with zeros up to a multiple of the patch
   size (zero after normalisation = the mean colour, which is how the training crop pads),
   runs the segmenter on the whole image or, for large images, by sliding window
   (``window``/``stride``: the function ``gopt eval`` uses, :func:`gopt_adapter.inference.segment`),
   crops the logits back to the (scaled) input size and resizes them to the input's full size.
5. Returns the arg-max label map ``[H, W]`` at the input's full size; :func:`write_prediction` stores it as a PNG
   (mode ``L``, uint8 class ids, for up to 256 classes; 16-bit otherwise) and a figure panel
   (:func:`gopt_adapter.cli.visualize.make_panel`).

``gopt predict`` takes steps 2 and 3 from the adapter's stored
:class:`~gopt_adapter.preprocessing.Preprocessing` when it has one (flags override single
values), else from the defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.base import check_same_size, files_by_stem, read_image
from ..gopt_segmenter import GoptSegmenter
from ..inference import check_window, segment
from ..preprocessing import AUX_NORMALIZATIONS, NormalizeConfig, check_aux_channels, check_image_scale, scale_to_unit
from ..resize import resize_image, resize_logits, scaled_size
from .visualize import class_palette, colorize_aux, make_panel, save_png

__all__ = [
    "IMAGE_SUFFIXES",
    "ImagePair",
    "resolve_class_names",
    "read_pair",
    "find_pairs",
    "predict_labels",
    "label_image",
    "write_prediction",
    "parse_json_kwargs",
]

#: File endings read as images (case-insensitive).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


@dataclass
class ImagePair:
    """One input pair, read and scaled to [0, 1]; the aux fields are ``None`` for RGB alone."""

    stem: str
    rgb: np.ndarray  # float32 [H, W, 3] in [0, 1]
    aux: np.ndarray | None  # float32 [H, W, C] in [0, 1]
    aux_raw: np.ndarray | None  # [H, W, C] as stored (for display)
    aux_valid: np.ndarray | None  # bool [H, W]: pixels with a reading (integer 0 = none)
    aux_kind: str  # "thermal", "depth", "auxiliary", or "missing" (for the panel title)

    @property
    def rgb_uint8(self) -> np.ndarray:
        return np.clip(np.rint(self.rgb * 255), 0, 255).astype(np.uint8)


def resolve_class_names(spec: str | None, num_classes: int, stored: Sequence[str] | None = None) -> list[str]:
    """Class names from a comma list, a dataset registry name, else ``stored`` (the names an
    adapter file holds), else ``class 0..K-1``.

    Registry names: ``nyudv2``, ``sunrgbd``, ``mfnet`` (9 classes with "unlabeled", or the
    8 without it), ``pst900``, ``whu_opt_sar`` (8, or 6 without background and others;
    for 7 give the names), ``synthetic`` (the world with ``num_classes``
    classes) or ``synthetic:<mode>``. Raises ``ValueError`` when the count differs from
    ``num_classes``.
    """
    if not spec:
        return list(stored) if stored is not None else [f"class {i}" for i in range(num_classes)]
    from ..data import DATASETS, MFNET_CLASSES, WHU_OPT_SAR_CLASSES, WORLDS

    key = spec.strip().lower().replace("-", "_")
    mode = None
    if key.startswith("synthetic:"):
        key, mode = key.split(":", 1)
    names: Sequence[str] | None = None
    source = f"dataset {spec!r}"
    if key == "synthetic":
        worlds = {m: [c.name for c in classes] for m, classes in WORLDS.items()}
        if mode is not None:
            if mode not in worlds:
                raise ValueError(f"unknown synthetic world {mode!r}; choose one of {sorted(worlds)}")
            names = worlds[mode]
        else:
            matching = [m for m, n in worlds.items() if len(n) == num_classes]
            names = worlds[matching[0]] if matching else worlds["depth"]
    elif key == "mfnet":
        names = list(MFNET_CLASSES) if num_classes == len(MFNET_CLASSES) else list(MFNET_CLASSES[1:])
    elif key == "whu_opt_sar":  # include_background / include_others drop the first / last name
        full = list(WHU_OPT_SAR_CLASSES)
        names = full if num_classes == len(full) else full[1:-1] if num_classes == len(full) - 2 else full
    elif key in DATASETS and DATASETS[key].class_names:
        names = list(DATASETS[key].class_names)
    elif "," in spec or key not in DATASETS:
        names = [n.strip() for n in spec.split(",")]
        source = "--class-names"
        if len(names) == 1 and num_classes > 1:
            raise ValueError(f"--class-names {spec!r} is neither a comma-separated list nor a dataset name "
                             f"({', '.join(sorted(DATASETS))})")
    if names is None:
        raise ValueError(f"dataset {spec!r} has no fixed class list")
    if len(names) != num_classes:
        raise ValueError(f"{source} has {len(names)} class names, the adapter predicts {num_classes} classes")
    return list(names)


# --------------------------------------------------------------------------- input
def _drop_equal_channels(arr: np.ndarray) -> np.ndarray:
    """A grey image stored as RGB(A) -> one channel."""
    if arr.ndim == 3 and arr.shape[2] in (3, 4) and all(np.array_equal(arr[..., 0], arr[..., c]) for c in (1, 2)):
        return arr[..., :1]
    return arr


def _to_unit_rgb(arr: np.ndarray, path: Path) -> np.ndarray:
    if arr.ndim == 2:
        raise ValueError(f"RGB image {path} has 1 channel (grey), expected 3")
    if arr.shape[2] not in (3, 4):
        raise ValueError(f"RGB image {path} has {arr.shape[2]} channels, expected 3 (or 4 with alpha / MFNet thermal)")
    rgb = arr[..., :3]
    if rgb.dtype.kind == "f":
        return np.clip(rgb.astype(np.float32), 0.0, 1.0)
    return scale_to_unit(rgb, "fixed", None, path)


def read_pair(rgb_path: str | Path, aux_path: str | Path | None, aux_channels: int = 1,
              aux_scale: str = "fixed", aux_max: float | None = None) -> ImagePair:
    """Reads an RGB + auxiliary pair (or one 4-channel MFNet image) scaled to [0, 1]. One
    3-channel image with no ``aux_path`` is RGB alone: the pair's aux fields are ``None``.

    Raises ``FileNotFoundError`` (missing file) or ``ValueError`` (undecodable file, wrong
    channel count, RGB and aux of different sizes) naming the file.
    """
    rgb_path = Path(rgb_path)
    aux_path = Path(aux_path) if aux_path is not None else None
    rgb_arr = read_image(rgb_path)
    combined = aux_path is None or aux_path.resolve() == rgb_path.resolve()
    if aux_path is None and rgb_arr.ndim == 3 and rgb_arr.shape[2] == 3:  # RGB alone: no aux image
        return ImagePair(rgb_path.stem, _to_unit_rgb(rgb_arr, rgb_path), None, None, None, "missing")
    if combined:
        if rgb_arr.ndim != 3 or rgb_arr.shape[2] != 3 + aux_channels:
            found = rgb_arr.shape[2] if rgb_arr.ndim == 3 else 1
            raise ValueError(f"{rgb_path} has {found} channel(s); a single input must hold RGB + {aux_channels} "
                             f"auxiliary channel(s) (MFNet: R, G, B, thermal), or RGB alone (3 channels)")
        aux_arr = rgb_arr[..., 3:]
        aux_kind = "thermal" if aux_channels == 1 else "auxiliary"
        aux_path = rgb_path
    else:
        aux_arr = read_image(aux_path)
        if aux_arr.ndim == 3 and aux_arr.shape[2] == 4 and aux_channels == 1:
            aux_arr = aux_arr[..., 3:]  # an MFNet image given as the aux input: its 4th channel is thermal
            aux_kind = "thermal"
        else:
            aux_kind = "depth" if aux_arr.dtype == np.uint16 and aux_channels == 1 else "auxiliary"
        if aux_channels == 1:
            aux_arr = _drop_equal_channels(aux_arr)
    rgb = _to_unit_rgb(rgb_arr, rgb_path)
    aux_arr = aux_arr[..., None] if aux_arr.ndim == 2 else aux_arr
    if aux_arr.shape[2] != aux_channels:
        raise ValueError(f"auxiliary image {aux_path} has {aux_arr.shape[2]} channel(s), the adapter takes "
                         f"{aux_channels}")
    check_same_size([(rgb, rgb_path), (aux_arr, aux_path)])
    if aux_scale not in AUX_NORMALIZATIONS:
        raise ValueError(f"aux scale must be one of {AUX_NORMALIZATIONS}, got {aux_scale!r}")
    if aux_scale == "fixed" and aux_max is None and aux_arr.dtype.kind == "f":
        raise ValueError(f"auxiliary image {aux_path} holds floats; give its range with aux_max or use per_image")
    aux = scale_to_unit(aux_arr, aux_scale, aux_max, aux_path)
    valid = aux_arr.reshape(*aux_arr.shape[:2], -1).any(axis=2) if aux_arr.dtype.kind in "ui" else \
        np.isfinite(aux_arr).all(axis=2)
    return ImagePair(rgb_path.stem, rgb, aux.astype(np.float32), aux_arr, valid, aux_kind)


def find_pairs(directory: str | Path) -> list[tuple[str, Path, Path | None]]:
    """``(stem, rgb, aux)`` of a folder: ``rgb/`` and ``aux/`` matched by file stem, or, with
    no ``rgb/`` subfolder, every image in the folder as a 4-channel MFNet image (aux None)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"pairs folder {directory} not found")
    if not (directory / "rgb").is_dir():
        images = files_by_stem(directory, IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no images and no rgb/ + aux/ subfolders in {directory}")
        return [(stem, path, None) for stem, path in images.items()]
    if not (directory / "aux").is_dir():
        raise FileNotFoundError(f"{directory / 'rgb'} exists but {directory / 'aux'} does not")
    rgb, aux = files_by_stem(directory / "rgb", IMAGE_SUFFIXES), files_by_stem(directory / "aux", IMAGE_SUFFIXES)
    unmatched = sorted(set(rgb) ^ set(aux))
    if unmatched:
        shown = ", ".join(unmatched[:5]) + (f" (+{len(unmatched) - 5} more)" if len(unmatched) > 5 else "")
        raise ValueError(f"stems without a partner in {directory} rgb/ and aux/: {shown}")
    if not rgb:
        raise FileNotFoundError(f"no images in {directory / 'rgb'}")
    return [(stem, rgb[stem], aux[stem]) for stem in rgb]


# --------------------------------------------------------------------------- forward
@torch.no_grad()
def predict_labels(segmenter: GoptSegmenter, pair: ImagePair, normalize: NormalizeConfig = NormalizeConfig(),
                   device: torch.device | str = "cpu", image_scale: float = 1.0, window: int | None = None,
                   stride: int | None = None) -> np.ndarray:
    """Arg-max class ids ``int64 [H, W]`` of one pair at its full size: inputs resized by
    ``image_scale`` (the adapter's preprocessing), zero-padded to the patch size, logits
    (of the whole image, or by sliding window with ``window``/``stride``, as ``gopt eval``
    runs it: :func:`gopt_adapter.inference.segment`) cropped back and resized to ``[H, W]``.

    A pair without aux runs ``segmenter(rgb, None)``: the adapter's aux-missing mode.
    """
    check_image_scale(image_scale)
    check_window(window, stride)
    height, width = pair.rgb.shape[:2]
    size = scaled_size((height, width), image_scale)  # (h, w) the model sees
    ph, pw = segmenter.spec.patch_size
    pad = (0, -size[1] % pw, 0, -size[0] % ph)  # left, right, top, bottom
    dtype = next(segmenter.parameters()).dtype

    def model_input(image: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]  # [1, C, H, W]
        if size != (height, width):
            x = resize_image(x, size, antialias=image_scale < 1)  # [1, C, h, w]
        x = (x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
        return F.pad(x, pad).to(device, dtype)  # [1, C, h', w']; zeros = the normalisation mean

    aux = None
    if pair.aux is not None:
        check_aux_channels(normalize, pair.aux.shape[2])
        aux = model_input(pair.aux, normalize.aux_mean, normalize.aux_std)
    rgb = model_input(pair.rgb, normalize.rgb_mean, normalize.rgb_std)
    logits = segment(segmenter, rgb, aux, segmenter.config.num_classes, window, stride)  # [1, K, h', w']
    logits = resize_logits(logits[..., : size[0], : size[1]], (height, width))  # [1, K, H, W]
    return logits[0].argmax(0).cpu().numpy()


def label_image(label: np.ndarray, num_classes: int) -> Image.Image:
    """Class ids as a PNG-ready image: mode ``L`` (uint8) up to 256 classes, else 16-bit."""
    if num_classes <= 256:
        return Image.fromarray(label.astype(np.uint8), mode="L")
    return Image.fromarray(label.astype(np.uint16))


def write_prediction(out_dir: str | Path, pair: ImagePair, label: np.ndarray, class_names: Sequence[str],
                     aux_cmap: str | None = None, legend: str = "present", alpha: float = 0.6,
                     aux_title: str | None = None) -> tuple[Path, Path]:
    """Writes ``<stem>_label.png`` and ``<stem>_panel.png`` into ``out_dir``; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    label_path, panel_path = out_dir / f"{pair.stem}_label.png", out_dir / f"{pair.stem}_panel.png"
    save_png(label_image(label, len(class_names)), label_path)
    cmap = aux_cmap or ("inferno" if pair.aux_kind == "thermal" else "viridis")
    if pair.aux_raw is None:  # RGB alone: a blank pane
        aux_colour, aux_range = np.full_like(pair.rgb_uint8, 128), None
        title = aux_title or "No aux (missing mode)"
    else:
        raw = pair.aux_raw.astype(np.float64)
        raw = raw[..., 0] if raw.shape[2] == 1 else raw.mean(axis=2)
        aux_colour, aux_range = colorize_aux(raw, pair.aux_valid, cmap)
        title = aux_title or pair.aux_kind.capitalize()
    panel = make_panel(pair.rgb_uint8, aux_colour, label, class_names, class_palette(len(class_names)),
                       titles=("RGB", title, "Prediction"), aux_range=aux_range, aux_cmap=cmap, legend=legend,
                       alpha=alpha)
    save_png(panel, panel_path)
    return label_path, panel_path


def parse_json_kwargs(text: str | None) -> dict[str, Any]:
    """``--backbone-kwargs`` JSON (an object) -> dict; ``ValueError`` naming the problem."""
    if not text:
        return {}
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"--backbone-kwargs is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--backbone-kwargs must be a JSON object, got {type(value).__name__}")
    return value
