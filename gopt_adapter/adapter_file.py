"""Adapter files: one safetensors file per task, its bytes sealed with a checksum and verified on reading.

The file format only: it converts between bytes and an adapter's contents (config, tensors,
backbone fingerprint, preprocessing, class names, backbone origin) and knows no model. What
takes a segmenter (``save_adapter``, ``load_adapter``, building an adapter from a file) is in
:mod:`gopt_adapter.gopt_segmenter`.

Layout of a file: the adapter's state-dict tensors (aux embedding, class tokens, prompters,
head with its BatchNorm buffers) and string metadata:

- ``format``: ``"gopt-adapter"``; ``format_version``: ``"3"``; ``library_version``;
- ``config``: the :class:`GoptConfig` as JSON;
- ``backbone``: the backbone fingerprint as JSON (class, width, depth, patch size, prefix
  tokens and the SHA-256 of the frozen weights);
- ``preprocessing`` (optional): the adapter's :class:`Preprocessing` as JSON (aux scaling and
  mean/std for ``gopt predict``); files without it load with ``preprocessing=None``;
- ``class_names`` (optional): the JSON list of the adapter's class names;
- ``timm_model`` (optional): ``{"name": ..., "kwargs": {...} or null}``, the timm model name
  and ``create_model`` kwargs the backbone was built with
  (:func:`~gopt_adapter.backbone.backbone_origin`), so that ``gopt predict`` / ``gopt eval``
  rebuild it from the file plus the weights (:func:`gopt_adapter.gopt_segmenter.backbone_for_adapter`);
  optional keys are an addition within format version 2: files without them load with
  ``None``;
- ``checksum``: SHA-256 over all other metadata, the tensor index (every tensor's name, dtype,
  shape and offsets) and the data bytes, so a flipped bit anywhere in the file is caught
  before any weight is copied. It is one pass over the file's bytes: verifying a ViT-B
  adapter costs about 3 ms.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

from .backbone import BackboneSpec
from .config import GoptConfig
from .errors import AdapterError, AdapterNotFoundError, BackboneMismatchError, WeightsMismatchError
from .numerics import check_finite
from .preprocessing import Preprocessing, check_aux_channels
from .version import __version__

FORMAT = "gopt-adapter"
FORMAT_VERSION = "3"  # 2: one-pass checksum, ACP query in the config; 3: scene-normalised aux tokens, eq. 10 count + 1
_METADATA_KEYS = {"format", "format_version", "library_version", "config", "backbone", "checksum"}
_SAVE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AdapterFile:
    """A parsed and verified adapter file (nothing has touched a model yet)."""

    path: Path
    config: GoptConfig
    backbone: dict[str, Any]
    library_version: str
    tensors: dict[str, torch.Tensor]
    preprocessing: Preprocessing | None = None
    class_names: tuple[str, ...] | None = None
    backbone_name: str | None = None  # the timm model name (None: not recorded)
    backbone_kwargs: dict[str, Any] | None = None  # its create_model kwargs (None: not recorded)


def fingerprint(spec: BackboneSpec, weights_sha256: str) -> dict[str, Any]:
    return {**spec.structure(), "weights_sha256": weights_sha256}


def _checksum(metadata: Mapping[str, str], header: Mapping[str, Any], body: bytes | memoryview) -> str:
    """SHA-256 of the metadata (all but ``checksum``), the tensor index and the data bytes."""
    digest = hashlib.sha256()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    digest.update(json.dumps({k: v for k, v in header.items() if k != "__metadata__"}, sort_keys=True).encode())
    digest.update(body)
    return digest.hexdigest()


def _split(data: bytes, path: Path) -> tuple[dict[str, Any], memoryview]:
    """The parsed JSON header of safetensors bytes and a view of the data section behind it."""
    if len(data) < 8:
        raise AdapterError(f"{path}: not a safetensors file ({len(data)} bytes, too short for a header)")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise AdapterError(f"{path}: not a safetensors file or truncated (header of {header_len} bytes, file {len(data)})")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterError(f"{path}: not a safetensors file or corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise AdapterError(f"{path}: not a safetensors file (header is not a JSON object)")
    body = memoryview(data)[8 + header_len :]
    try:
        end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise AdapterError(f"{path}: not a safetensors file or corrupt header (bad tensor index)") from None
    if not isinstance(end, int) or end != len(body):
        raise AdapterError(f"{path}: truncated or corrupt: the header indexes {end} data bytes, the file holds {len(body)}")
    return header, body


def seal(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> bytes:
    """Safetensors bytes of ``tensors`` with ``metadata`` plus the ``checksum`` over both.

    The checksum covers the data section as safetensors lays it out, so the file is written
    once without it to learn that layout; offsets are relative to the data section, so adding
    the checksum to the header moves nothing. Raises :class:`AdapterError` naming the tensors
    that hold NaN or inf values (checked here, after any cast: a float32 weight beyond float16's
    range becomes inf in a float16 file), so no adapter file ever holds one.
    """
    check_finite(tensors, AdapterError)
    metadata = {k: v for k, v in metadata.items() if k != "checksum"}
    header, body = _split(save_safetensors_bytes(dict(tensors), metadata=metadata), Path("<memory>"))
    sealed = save_safetensors_bytes(dict(tensors), metadata={**metadata, "checksum": _checksum(metadata, header, body)})
    final_header, final_body = _split(sealed, Path("<memory>"))
    if {k: v for k, v in final_header.items() if k != "__metadata__"} != \
            {k: v for k, v in header.items() if k != "__metadata__"} or final_body != body:
        raise RuntimeError("safetensors laid the tensors out differently on the second write")
    return sealed


def encode_adapter(config: GoptConfig, tensors: Mapping[str, torch.Tensor], backbone: Mapping[str, Any], *,
                   preprocessing: Preprocessing | None = None, class_names: Sequence[str] | None = None,
                   origin: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> bytes:
    """The bytes of an adapter file: ``tensors`` (an adapter's state dict; floating ones cast to
    ``dtype``) and the metadata (``backbone`` is the fingerprint, see :func:`fingerprint`).

    ``origin`` (``{"name", "kwargs"}``, see :func:`~gopt_adapter.backbone.backbone_origin`) is
    recorded as ``timm_model``; kwargs that are not JSON are recorded as unknown (``null``).
    """
    if not isinstance(config, GoptConfig):
        raise TypeError(f"adapter files hold GoPT adapters (a GoptConfig), not a {type(config).__name__}")
    if dtype is not None and dtype not in _SAVE_DTYPES:
        raise ValueError(f"dtype must be one of {_SAVE_DTYPES} or None, got {dtype}")
    if class_names is not None and len(class_names) != config.num_classes:
        raise ValueError(f"{len(class_names)} class names for an adapter of {config.num_classes} classes")
    stored = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu")
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        stored[name] = tensor.contiguous()
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "backbone": json.dumps(dict(backbone), sort_keys=True),
    }
    if preprocessing is not None:
        check_aux_channels(preprocessing.normalize, config.aux_channels)
        metadata["preprocessing"] = json.dumps(preprocessing.to_dict(), sort_keys=True)
    if class_names is not None:
        metadata["class_names"] = json.dumps(list(class_names))
    if origin is not None:
        try:
            kwargs = json.loads(json.dumps(origin.get("kwargs"), sort_keys=True))
        except (TypeError, ValueError):  # e.g. a layer class as a kwarg: cannot be rebuilt from JSON
            kwargs = None
        metadata["timm_model"] = json.dumps({"name": str(origin["name"]), "kwargs": kwargs}, sort_keys=True)
    return seal(stored, metadata)


def _read_metadata(header: Mapping[str, Any], path: Path) -> dict[str, str]:
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise AdapterError(f"{path}: a safetensors file but not a GoPT adapter (no format={FORMAT!r} metadata)")
    missing = _METADATA_KEYS - set(metadata)
    if missing:
        raise AdapterError(f"{path}: adapter metadata is missing {sorted(missing)}")
    if metadata["format_version"] != FORMAT_VERSION:
        raise AdapterError(
            f"{path}: adapter format version {metadata['format_version']!r}; this library reads {FORMAT_VERSION!r}: "
            f"train it again, or use gopt-adapter {metadata.get('library_version', '?')}, which wrote it"
        )
    return metadata


def read_adapter_file(path: str | os.PathLike) -> AdapterFile:
    """Reads and verifies an adapter file; raises :class:`AdapterError` naming what is wrong."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AdapterNotFoundError(f"{path}: no such adapter file") from None
    except OSError as exc:
        raise AdapterError(f"{path}: cannot read adapter file ({exc})") from None
    header, body = _split(data, path)
    metadata = _read_metadata(header, path)
    if _checksum(metadata, header, body) != metadata["checksum"]:
        raise AdapterError(f"{path}: checksum mismatch: the file is corrupt (changed after it was written)")
    try:
        tensors = load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise AdapterError(f"{path}: corrupt or truncated safetensors data ({exc})") from None
    try:
        config = GoptConfig.from_dict(json.loads(metadata["config"]))
        backbone = json.loads(metadata["backbone"])
    except (ValueError, TypeError) as exc:
        raise AdapterError(f"{path}: invalid adapter config ({exc})") from None
    if not isinstance(backbone, dict):
        raise AdapterError(f"{path}: invalid backbone fingerprint (a JSON object expected, got {type(backbone).__name__})")
    preprocessing = None
    if "preprocessing" in metadata:
        try:
            preprocessing = Preprocessing.from_dict(json.loads(metadata["preprocessing"]))
            check_aux_channels(preprocessing.normalize, config.aux_channels)
        except ValueError as exc:
            raise AdapterError(f"{path}: invalid preprocessing ({exc})") from None
    class_names, name, kwargs = _read_optional(metadata, config, path)
    return AdapterFile(path, config, backbone, metadata["library_version"], tensors, preprocessing,
                       class_names, name, kwargs)


def _read_optional(metadata: Mapping[str, str], config: GoptConfig, path: Path):
    """``class_names``, timm name and kwargs of the metadata (each ``None`` when absent)."""
    class_names = name = kwargs = None
    try:
        if "class_names" in metadata:
            class_names = json.loads(metadata["class_names"])
            if not (isinstance(class_names, list) and all(isinstance(n, str) for n in class_names)):
                raise ValueError("class_names must be a JSON list of strings")
            if len(class_names) != config.num_classes:
                raise ValueError(f"{len(class_names)} class names for {config.num_classes} classes")
            class_names = tuple(class_names)
        if "timm_model" in metadata:
            model = json.loads(metadata["timm_model"])
            if not (isinstance(model, dict) and isinstance(model.get("name"), str)
                    and (model.get("kwargs") is None or isinstance(model["kwargs"], dict))):
                raise ValueError("timm_model must be {\"name\": str, \"kwargs\": object or null}")
            name, kwargs = model["name"], model.get("kwargs")
    except ValueError as exc:
        raise AdapterError(f"{path}: invalid adapter metadata ({exc})") from None
    return class_names, name, kwargs


def check_backbone(file: AdapterFile, expected: Mapping[str, Any], allow_weights_mismatch: bool = False) -> None:
    """Raises :class:`AdapterError` when ``file`` was made for a different backbone."""
    found = file.backbone
    diffs = [
        f"{key}: file {found.get(key)!r}, backbone {value!r}"
        for key, value in expected.items()
        if key != "weights_sha256" and found.get(key) != value
    ]
    if diffs:
        raise BackboneMismatchError(f"{file.path}: adapter made for another backbone ({'; '.join(diffs)})")
    if not allow_weights_mismatch and found.get("weights_sha256") != expected["weights_sha256"]:
        raise WeightsMismatchError(
            f"{file.path}: adapter trained on other backbone weights (sha256 {str(found.get('weights_sha256'))[:12]}..., "
            f"this backbone {expected['weights_sha256'][:12]}...)"
        )


def check_tensors(file: AdapterFile, expected: Mapping[str, torch.Tensor]) -> None:
    """Every tensor of an adapter's state ``expected`` present in ``file`` with the same shape, and no other."""
    missing = sorted(set(expected) - set(file.tensors))
    extra = sorted(set(file.tensors) - set(expected))
    wrong = [
        f"{name} {tuple(file.tensors[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in file.tensors and file.tensors[name].shape != tensor.shape
    ]
    wrong += [
        f"{name} has dtype {file.tensors[name].dtype}"
        for name, tensor in expected.items()
        if name in file.tensors and not _dtype_fits(file.tensors[name].dtype, tensor.dtype)
    ]
    if missing or extra or wrong:
        raise AdapterError(f"{file.path}: tensors do not fit the adapter (missing {missing}, unexpected {extra}, "
                           f"shape/dtype {wrong})")


def _dtype_fits(stored: torch.dtype, expected: torch.dtype) -> bool:
    """Floating tensors may be stored in any of the save dtypes; others exactly as in memory."""
    return stored in _SAVE_DTYPES if expected.is_floating_point else stored == expected
