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
    "timm ViTs whose flat `blocks` stack of one width follows one patch embedding "
    "(`patch_embed`, a CNN stem included, or NaFlexVit's `embeds`): VisionTransformer (vit, deit, "
    "deit3, dinov2, MAE, *_gap_*, and the hybrids with a CNN stem: vit_*_r26/r50/resnet*, vitamin_*, "
    "*_mci_*), VisionTransformerDistilled, Eva (eva02), Beit, VisionTransformerRelPos, "
    "VisionTransformerSAM, Cait, ConVit, Xcit, NaFlexVit (image tensors, not patch dictionaries) and "
    "the Qwen3, DeepSeek and Gemma4 ViT encoders (`*_enc`). Refused: hierarchical or multi-stream "
    "transformers (Swin, Hiera, CrossVit, TNT, ...), CNNs, and classifier wrappers around an `encoder`"
)


@dataclass(frozen=True)
class BackboneSpec:
    """Geometry of a plain ViT backbone, read from the timm model.

    Blocks take ``[B, P + S, D]`` token sequences (prefix tokens first) or, for SAM,
    ``[B, h, w, D]`` maps with no prefix tokens. ``patch_size`` is the token stride in pixels:
    the patch size of a plain ViT, the stem's total stride times the projection's patch size for
    a hybrid (``HybridEmbed``). ``block_prefix_tokens[l]`` is the number of prefix tokens block
    ``l`` sees, which differs from ``num_prefix_tokens`` where the class token joins late (Cait
    and Xcit after their ``blocks``, ConVit at block ``local_up_to_layer``). Input heights and
    widths must be multiples of ``size_multiple``: the token stride, or with ``dynamic_img_pad``
    the stride of a hybrid's CNN stem (a hybrid pads its feature map, not the image; (1, 1) for
    a plain ViT).
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
    block_prefix_tokens: tuple[int, ...] = ()
    size_multiple: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        if not self.block_prefix_tokens:  # every block sees the model's prefix tokens
            object.__setattr__(self, "block_prefix_tokens", (self.num_prefix_tokens,) * self.depth)
        if self.size_multiple is None:
            object.__setattr__(self, "size_multiple", (1, 1) if self.dynamic_img_pad else self.patch_size)

    @classmethod
    def from_model(cls, model: nn.Module) -> "BackboneSpec":
        """Reads the spec, raising ``TypeError`` for models GoPT cannot wrap (the model is only read)."""
        name = f"{type(model).__module__}.{type(model).__qualname__}"
        embed, problem = None, _stack_problem(model)
        if problem is None:
            embed, problem = _patch_embedding(model)
        if problem is None:
            token_stride, stem_stride = _token_stride(embed)
            in_chans = _image_channels(embed, token_stride[0] // stem_stride[0] * token_stride[1] // stem_stride[1])
            if in_chans is None:
                problem = f"its patch embedding {type(embed).__name__} shows no image channel count"
        if problem:
            raise TypeError(f"GoPT cannot wrap {name}: {problem}. Supported: {SUPPORTED}.")

        pad = bool(getattr(embed, "dynamic_img_pad", False))
        strict = bool(getattr(embed, "strict_img_size", False))
        img_size = getattr(embed, "img_size", None)
        depth = len(model.blocks)
        num_prefix_tokens = int(getattr(model, "num_prefix_tokens", 0) or 0)
        return cls(
            class_name=name,
            embed_dim=model.embed_dim,
            num_features=int(getattr(model, "num_features", model.embed_dim)),
            depth=depth,
            patch_size=token_stride,
            num_prefix_tokens=num_prefix_tokens,
            in_chans=in_chans,
            dynamic_img_size=not strict,
            dynamic_img_pad=pad,
            img_size=tuple(int(s) for s in img_size) if strict and img_size is not None else None,
            block_prefix_tokens=_block_prefix_tokens(model, depth, num_prefix_tokens),
            size_multiple=_size_multiple(model, stem_stride if pad else token_stride),
        )

    def prefix_tokens(self, block_index: int) -> int:
        """Prefix tokens in front of the patch tokens of block ``block_index``'s input."""
        return self.block_prefix_tokens[block_index]

    def check_image_size(self, height: int, width: int) -> None:
        """Raises ``ValueError`` when the backbone cannot take an image of this size."""
        if self.img_size is not None and (height, width) != self.img_size:
            raise ValueError(
                f"{self.class_name} has a fixed input size {self.img_size}, got {(height, width)}; "
                "create it with `img_size=` matching your images"
            )
        sh, sw = self.size_multiple
        if height % sh or width % sw:
            fix = "" if self.dynamic_img_pad else " or create the backbone with `dynamic_img_pad=True`"
            what = "patch size" if self.size_multiple == self.patch_size else "multiple it needs"
            raise ValueError(
                f"image size {(height, width)} is not divisible by the {what} {(sh, sw)}; resize/pad the inputs{fix}"
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
        for key in ("patch_size", "block_prefix_tokens", "size_multiple"):
            data[key] = list(data[key])
        return data


def create_backbone(name: str, weights: str | os.PathLike | None = None,
                    backbone_kwargs: dict[str, Any] | None = None, pretrained: bool = False,
                    pad_images: bool = False) -> nn.Module:
    """``timm.create_model`` for dense prediction at any size, in eval mode, with local weights
    (safetensors or ``.pth``, read with ``weights_only=True``) if given, timm's own download
    with ``pretrained=True``, else random weights; no classifier (``num_classes=0``).

    Models that have no ``dynamic_img_size`` option (Beit) are built at their fixed
    ``img_size``. With ``pad_images`` (``gopt train``) the model is also built with
    ``dynamic_img_pad=True`` where its class takes that option (VisionTransformer, Eva,
    NaFlexVit, DeepSeek's encoder) and ``backbone_kwargs`` does not set it: timm then zero-pads
    every image at the bottom/right up to its patch grid, so any image size works with any patch
    size, and sizes that are already multiples give bit-identical outputs (the pad is empty).
    The model remembers ``name`` and ``backbone_kwargs``, plus ``dynamic_img_pad`` when
    ``pad_images`` set it (:data:`ORIGIN_ATTRIBUTE`), so that adapter files record how to build
    it again. Raises ``ValueError`` (unknown model, unusable kwargs) or ``RuntimeError``
    (weights that do not fit) with timm's message.
    """
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
    preferred = {"dynamic_img_size": True, **({"dynamic_img_pad": True} if pad_images else {})}
    model, taken = _create_model(name, kwargs, {key: value for key, value in preferred.items() if key not in kwargs})
    recorded = dict(backbone_kwargs or {})
    if "dynamic_img_pad" in taken:  # a choice of this call, not a default of create_backbone: rebuilds repeat it
        recorded["dynamic_img_pad"] = taken["dynamic_img_pad"]
    setattr(model, ORIGIN_ATTRIBUTE, {"name": name, "kwargs": recorded})
    return model


def _create_model(name: str, kwargs: dict[str, Any], preferred: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """``timm.create_model(name, **preferred, **kwargs)`` in eval mode, leaving out each
    ``preferred`` option the model's class refuses (the ``TypeError`` names it, raised before
    any weight is made); returns the model and the preferred options it took."""
    import timm

    preferred = dict(preferred)
    while True:
        try:
            return timm.create_model(name, **preferred, **kwargs).eval(), preferred
        except TypeError as exc:
            refused = [key for key in preferred if key in str(exc)]
            if not refused:
                raise
            for key in refused:
                del preferred[key]


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


def _patch_embedding(model: nn.Module) -> tuple[nn.Module | None, str | None]:
    """The module that turns the image into tokens, or why there is none GoPT can use."""
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        embed = getattr(model, "embeds", None)  # NaFlexVit
    if isinstance(embed, (nn.ModuleList, nn.Sequential)):
        return None, f"it embeds {len(embed)} token streams at different patch sizes (`patch_embed` is a list)"
    if embed is None and getattr(model, "pixel_embed", None) is not None:
        return None, "its blocks carry pixel-level inner tokens next to the patch tokens (`pixel_embed`)"
    if embed is None or getattr(embed, "patch_size", None) is None:
        return None, "it has no patch embedding (`patch_embed` or `embeds`) with a `patch_size`"
    return embed, None


def _stack_problem(model: nn.Module) -> str | None:
    """Why ``model.blocks`` is not one flat stack of equal-width blocks on one token sequence."""
    blocks = getattr(model, "blocks", None)
    embed_dim = getattr(model, "embed_dim", None)
    if blocks is None and isinstance(getattr(getattr(model, "encoder", None), "blocks", None), nn.Module):
        return ("it wraps its transformer as `.encoder`; pass `model.encoder` "
                "(the `*_enc` model of the same name is that encoder alone)")
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0:
        return "it has no flat `blocks` stack"
    if isinstance(embed_dim, (tuple, list)):
        return "it has one width per stage or token stream (`embed_dim` is a list): a hierarchical or multi-stream transformer"
    if not isinstance(embed_dim, int):
        return "it has no single `embed_dim`"
    if not hasattr(model, "forward_intermediates"):
        return "it has no `forward_intermediates`"
    widths = {_block_width(b) for b in blocks} - {None}
    if widths - {embed_dim}:
        return f"its blocks have different widths {sorted(widths)}"
    return None


def _pair(value: Any) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _token_stride(embed: nn.Module) -> tuple[tuple[int, int], tuple[int, int]]:
    """(pixels per token, the CNN stem's stride) of a patch embedding.

    A hybrid's ``HybridEmbed`` runs a CNN of stride ``feature_ratio`` and then a projection of
    ``patch_size`` on its feature map; Xcit's ``ConvPatchEmbed`` keeps ``patch_size`` as an int.
    """
    patch = _pair(embed.patch_size)
    ratio = getattr(embed, "feature_ratio", None)
    if ratio is None:
        return patch, (1, 1)
    stem = _pair(ratio)
    return (stem[0] * patch[0], stem[1] * patch[1]), stem


def _image_channels(embed: nn.Module, pixels_per_token: int) -> int | None:
    """Channels of the image a patch embedding takes: ``in_chans``, else its first layer's inputs
    (a conv, or a linear patchifier of ``pixels_per_token * C`` inputs, as Gemma4's)."""
    in_chans = getattr(embed, "in_chans", None)
    if isinstance(in_chans, int) and not isinstance(in_chans, bool):
        return in_chans
    for layer in embed.modules():
        if isinstance(layer, nn.Conv2d):
            return int(layer.in_channels)
        if isinstance(layer, nn.Linear):
            channels, rest = divmod(layer.in_features, pixels_per_token)
            return channels if rest == 0 else None
    return None


def _size_multiple(model: nn.Module, multiple: tuple[int, int]) -> tuple[int, int]:
    """``multiple``, times the cell of Gemma4's soft-token pooler, which checks every input."""
    if getattr(model, "global_pool", None) == "soft" and isinstance(getattr(model, "pooling_kernel_size", None), int):
        return multiple[0] * model.pooling_kernel_size, multiple[1] * model.pooling_kernel_size
    return multiple


def _block_prefix_tokens(model: nn.Module, depth: int, num_prefix_tokens: int) -> tuple[int, ...]:
    """Prefix tokens each block of ``model.blocks`` sees.

    Cait (``blocks_token_only``) and Xcit (``cls_attn_blocks``) add the class token after the
    ``blocks``, in class-attention layers GoPT leaves alone; ConVit inserts it before block
    ``local_up_to_layer``.
    """
    if getattr(model, "blocks_token_only", None) is not None or getattr(model, "cls_attn_blocks", None) is not None:
        return (0,) * depth
    joins = getattr(model, "local_up_to_layer", None)
    if isinstance(joins, int):
        late = num_prefix_tokens if getattr(model, "cls_token", None) is not None else 0
        return tuple(0 if index < joins else late for index in range(depth))
    return (num_prefix_tokens,) * depth


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
