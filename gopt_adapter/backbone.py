"""What GoPT needs to know about a timm ViT: its geometry, its input rules, its identity."""

from __future__ import annotations

import hashlib
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

SUPPORTED = (
    "timm ViTs with a flat `blocks` stack of equal width and a `patch_embed`: VisionTransformer "
    "(vit, deit, deit3, dinov2, MAE, *_gap_*), Eva (eva02), Beit and VisionTransformerSAM"
)


@dataclass(frozen=True)
class BackboneSpec:
    """Geometry of a plain ViT backbone, read from the timm model.

    Blocks take ``[B, P + S, D]`` token sequences (prefix tokens first) or, for SAM,
    ``[B, h, w, D]`` maps with no prefix tokens.
    """

    class_name: str
    embed_dim: int
    num_features: int
    depth: int
    patch_size: tuple[int, int]
    num_prefix_tokens: int
    in_chans: int
    dynamic_img_size: bool
    dynamic_img_pad: bool
    img_size: tuple[int, int] | None

    @classmethod
    def from_model(cls, model: nn.Module) -> "BackboneSpec":
        """Reads the spec, raising ``TypeError`` for models without a flat stack of ViT blocks."""
        name = f"{type(model).__module__}.{type(model).__qualname__}"
        blocks = getattr(model, "blocks", None)
        patch_embed = getattr(model, "patch_embed", None)
        embed_dim = getattr(model, "embed_dim", None)
        problem = None
        if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
            problem = "it has no flat `blocks` stack"
        elif patch_embed is None or getattr(patch_embed, "patch_size", None) is None:
            problem = "it has no `patch_embed` with a `patch_size`"
        elif not isinstance(embed_dim, int):
            problem = "it has no single `embed_dim`"
        elif not hasattr(model, "forward_intermediates"):
            problem = "it has no `forward_intermediates`"
        else:
            widths = {_block_width(b) for b in blocks} - {None}
            if widths - {embed_dim}:
                problem = f"its blocks have different widths {sorted(widths)}"
        if problem:
            raise TypeError(f"GoPT cannot wrap {name}: {problem}. Supported: {SUPPORTED}.")

        proj = patch_embed.proj
        strict = bool(getattr(patch_embed, "strict_img_size", False))
        img_size = getattr(patch_embed, "img_size", None)
        return cls(
            class_name=name,
            embed_dim=embed_dim,
            num_features=int(getattr(model, "num_features", embed_dim)),
            depth=len(blocks),
            patch_size=tuple(int(p) for p in patch_embed.patch_size),
            num_prefix_tokens=int(getattr(model, "num_prefix_tokens", 0) or 0),
            in_chans=int(proj.in_channels),
            dynamic_img_size=not strict,
            dynamic_img_pad=bool(getattr(patch_embed, "dynamic_img_pad", False)),
            img_size=tuple(int(s) for s in img_size) if strict and img_size is not None else None,
        )

    def check_image_size(self, height: int, width: int) -> None:
        """Raises ``ValueError`` when the backbone cannot take an image of this size."""
        if self.img_size is not None and (height, width) != self.img_size:
            raise ValueError(
                f"{self.class_name} has a fixed input size {self.img_size}, got {(height, width)}; "
                "create it with `img_size=` matching your images"
            )
        ph, pw = self.patch_size
        if not self.dynamic_img_pad and (height % ph or width % pw):
            raise ValueError(
                f"image size {(height, width)} is not divisible by the patch size {self.patch_size}; "
                "resize/pad the inputs or create the backbone with `dynamic_img_pad=True`"
            )

    def structure(self) -> dict[str, Any]:
        """The fields that must agree between an adapter file and a backbone."""
        return {
            "class_name": self.class_name,
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "patch_size": list(self.patch_size),
            "num_prefix_tokens": self.num_prefix_tokens,
        }

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["patch_size"] = list(self.patch_size)
        return data


def create_backbone(name: str, weights: str | os.PathLike | None = None,
                    backbone_kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """``timm.create_model`` for dense prediction at any size, in eval mode, with local weights
    (safetensors or ``.pth``, read with ``weights_only=True``) if given, timm's own download
    with ``pretrained=True``, else random weights; no classifier (``num_classes=0``).

    Models that have no ``dynamic_img_size`` option (Beit) are built at their fixed
    ``img_size``. The model remembers ``name`` and ``backbone_kwargs``
    (:data:`ORIGIN_ATTRIBUTE`) so that adapter files record how to build it again. Raises
    ``ValueError`` (unknown model, unusable kwargs) or ``RuntimeError`` (weights that do not
    fit) with timm's message.
    """
    import timm

    kwargs: dict[str, Any] = {"num_classes": 0, **(backbone_kwargs or {})}
    if weights:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file {weights} not found")
        if path.suffix.lower() != ".safetensors":
            check_pickle_is_tensors_only(path)  # whatever timm's loader does with it next
        kwargs.update(pretrained=True, pretrained_cfg_overlay=dict(file=str(path.resolve())))
    else:
        kwargs["pretrained"] = bool(pretrained)
    model = None
    if "dynamic_img_size" not in kwargs:
        try:
            model = timm.create_model(name, dynamic_img_size=True, **kwargs).eval()
        except TypeError as exc:
            if "dynamic_img_size" not in str(exc):
                raise
    if model is None:
        model = timm.create_model(name, **kwargs).eval()
    setattr(model, ORIGIN_ATTRIBUTE, {"name": name, "kwargs": dict(backbone_kwargs or {})})
    return model


def check_pickle_is_tensors_only(path: Path) -> None:
    """Raises ``ValueError`` unless ``torch.load(path, weights_only=True)`` reads the file: a
    ``.pth`` that needs arbitrary pickled code is refused before any loader unpickles it."""
    try:
        try:
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc) and "zipfile" not in str(exc):
                raise
            torch.load(path, map_location="cpu", weights_only=True)  # the legacy (non-zip) format has no mmap
    except Exception as exc:  # UnpicklingError for anything but tensors and plain containers
        raise ValueError(f"weights file {path} cannot be loaded safely (torch.load with weights_only=True "
                         f"refused it: {str(exc).splitlines()[0]}); convert it to .safetensors") from None


#: Attribute of a model built by :func:`create_backbone`: ``{"name": timm name, "kwargs": {...}}``.
ORIGIN_ATTRIBUTE = "gopt_origin"


def backbone_origin(model: nn.Module) -> dict[str, Any] | None:
    """How to build ``model`` again: the timm name and kwargs :func:`create_backbone` got, else the
    name timm recorded (``pretrained_cfg`` architecture and tag) with unknown kwargs (``None``);
    ``None`` for a model timm did not build."""
    origin = getattr(model, ORIGIN_ATTRIBUTE, None)
    if isinstance(origin, dict):
        return {"name": origin["name"], "kwargs": dict(origin["kwargs"])}
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("architecture"):
        tag = cfg.get("tag")
        return {"name": f"{cfg['architecture']}.{tag}" if tag else cfg["architecture"], "kwargs": None}
    return None


def _block_width(block: nn.Module) -> int | None:
    norm = getattr(block, "norm1", None)
    shape = getattr(norm, "normalized_shape", None)
    return int(shape[0]) if shape else None


#: Elements per tensor that :func:`weights_version` reads.
PROBE_ELEMENTS = 64


def weights_version(module: nn.Module) -> tuple:
    """Cheap identity of a module's current weights, for revalidating a cached digest.

    Per parameter and buffer: storage, dtype, device, shape and in-place version, which change
    when a tensor is replaced (``.half()``, ``.to()``) or modified in place through autograd
    (``copy_``, an optimizer step); plus the values of about :data:`PROBE_ELEMENTS` evenly
    strided elements of every tensor, which catch edits that bypass the version counter
    (``p.data.mul_(2)``, ``load_state_dict`` into ``.data``) as long as they touch a sampled
    element. About 1 ms for ViT-B: it reads a few thousand numbers, not the weights.
    """
    tensors = [t.detach() for t in (*module.parameters(), *module.buffers())]
    layout = tuple((t.data_ptr(), t._version, t.dtype, t.device, t.shape) for t in tensors)
    samples: dict[tuple, list[torch.Tensor]] = {}
    for tensor in tensors:
        flat = tensor.reshape(-1)
        samples.setdefault((tensor.dtype, tensor.device), []).append(flat[:: max(1, flat.numel() // PROBE_ELEMENTS)])
    probe = tuple(bytes(tensor_bytes(torch.cat(group))) for group in samples.values())  # one copy per dtype
    return layout, probe


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Raw little-endian bytes of a tensor (any dtype, bf16 included) without a copy when possible."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def weights_digest(module: nn.Module) -> str:
    """SHA-256 over every state-dict tensor (dtype, shape and bytes) in registration order.

    Names are left out on purpose: wrapping blocks renames keys but not the weights, so the
    digest of a wrapped backbone equals that of the original model.
    """
    digest = hashlib.sha256()
    for tensor in module.state_dict().values():
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor_bytes(tensor))
    return digest.hexdigest()
