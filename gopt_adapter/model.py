"""The GoPT segmenter: a frozen timm ViT, its wrapped blocks, and one or more task adapters."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import __version__
from .adapter import GoptAdapter
from .adapter_io import (
    AdapterError,
    AdapterFile,
    adapter_from_file,
    check_backbone,
    fingerprint,
    read_adapter_file,
    save_adapter,
)
from .backbone import BackboneSpec, weights_digest, weights_version
from .config import GoptConfig
from .files import atomic_write_bytes
from .inject import PromptContext, PromptedBlock, Route, is_wrapped, unwrap_blocks, wrap_blocks

DEFAULT_ADAPTER = "default"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class GoptSegmenter(nn.Module):
    """RGB-X segmenter: ``segmenter(rgb, aux) -> logits [B, num_classes, H, W]``.

    The backbone (``self.backbone``, the user's timm model with wrapped blocks) is frozen and
    stays in eval mode; only the active adapter in ``self.adapters`` trains. Several adapters
    (tasks) share the one backbone in memory. Build it with :func:`apply_gopt`.
    A forward pass keeps per-call state on the segmenter: do not run one segmenter from
    several threads at once.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: GoptAdapter,
                 adapter_name: str = DEFAULT_ADAPTER, weights_sha256: str | None = None) -> None:
        check_adapter_name(adapter_name)  # before the model is touched
        super().__init__()
        self.spec = spec
        self._digest_cache = (weights_version(model), weights_sha256) if weights_sha256 else None
        self._original = {  # what remove_gopt restores
            "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
            "training": {name: m.training for name, m in model.named_modules()},
            "grad_checkpointing": getattr(model, "grad_checkpointing", None),
        }
        self._context = PromptContext()
        model.requires_grad_(False)
        if self._original["grad_checkpointing"]:
            model.grad_checkpointing = False  # timm would replay our prompters; see set_grad_checkpointing
        wrap_blocks(model, self._context)
        self.backbone = model
        self.adapters = nn.ModuleDict()
        self._active: str | None = None
        self._insert(adapter_name, adapter)
        self.set_adapter(adapter_name)
        self.train(model.training)

    # ----------------------------------------------------------------- forward
    def forward(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """``rgb [B, 3, H, W]`` and ``aux [B, C_aux, H, W]`` -> logits ``[B, K, H, W]``.

        Without an aux image (``aux=None``), or for the samples flagged in ``aux_missing``
        (bool ``[B]``; their aux values are not read), the adapter runs in its aux-missing
        mode. Only adapters trained with ``aux_dropout > 0`` have one.
        """
        features = self.features(rgb, aux, aux_missing)  # [B, D, h, w]
        logits = self.adapter.head(features)  # [B, K, h, w]
        return self.upsample(logits, rgb.shape[-2:])

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """Last block's patch tokens after the backbone's final norm, ``[B, D, h, w]``."""
        aux, aux_missing = self._missing_aux_inputs(rgb, aux, aux_missing)
        self._check_inputs(rgb, aux)
        adapter = self.adapter
        state = adapter.initial_state(aux) if aux_missing is None else adapter.initial_state(aux, aux_missing)
        return self._prompted_features(rgb, [Route(adapter, None, state)])

    def _prompted_features(self, rgb: torch.Tensor, routes: list[Route]) -> torch.Tensor:
        """The backbone's features ``[B, D, h, w]`` with each route's prompters on its samples."""
        if getattr(self.backbone, "grad_checkpointing", False):
            raise RuntimeError("timm's grad checkpointing replays the prompters; use segmenter.set_grad_checkpointing()")
        with self._context.active(routes):
            return self.backbone_features(rgb)

    def _missing_aux_inputs(self, rgb: torch.Tensor, aux: torch.Tensor | None,
                            aux_missing: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(aux, missing)`` for the adapter: ``aux=None`` becomes a zero image, all missing."""
        if aux is None and aux_missing is None:
            if rgb.ndim != 4:
                raise ValueError(f"expected rgb [B, {self.spec.in_chans}, H, W], got {tuple(rgb.shape)}")
            aux = rgb.new_zeros(rgb.shape[0], self.config.aux_channels, *rgb.shape[2:])
            aux_missing = torch.ones(rgb.shape[0], dtype=torch.bool, device=rgb.device)
        elif aux is None:
            raise ValueError("aux_missing needs an aux tensor (use aux=None when every sample lacks aux)")
        if aux_missing is None:
            return aux, None
        if getattr(self.adapter, "missing_aux", None) is None:
            raise ValueError(
                f"adapter {self.active_adapter!r} has no aux-missing mode (it was trained with aux_dropout=0, "
                "the default and the only setting of older adapter files, or it is a baseline): give every "
                "sample an aux image, or train an adapter with GoptConfig(aux_dropout > 0)"
            )
        if not isinstance(aux_missing, torch.Tensor) or aux_missing.dtype != torch.bool \
                or tuple(aux_missing.shape) != (aux.shape[0],):
            got = f"{aux_missing.dtype} {tuple(aux_missing.shape)}" if isinstance(aux_missing, torch.Tensor) \
                else type(aux_missing).__name__
            raise ValueError(f"aux_missing must be a bool tensor [B] = [{aux.shape[0]}], got {got}")
        return aux, aux_missing.to(aux.device)

    def backbone_features(self, rgb: torch.Tensor) -> torch.Tensor:
        """What the backbone computes with no prompter: the frozen RGB model's features."""
        return self.backbone.forward_intermediates(
            rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True
        )[-1]

    def upsample(self, logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Bilinear upsampling of patch logits to the input size (padding cropped off)."""
        if self.spec.dynamic_img_pad:
            (ph, pw), (h, w) = self.spec.patch_size, logits.shape[-2:]
            logits = F.interpolate(logits, size=(h * ph, w * pw), mode="bilinear", align_corners=False)
            return logits[..., : size[0], : size[1]]
        return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)

    def _check_inputs(self, rgb: torch.Tensor, aux: torch.Tensor) -> None:
        config, spec = self.config, self.spec
        shapes = f"rgb {tuple(rgb.shape)} and aux {tuple(aux.shape)}"
        expected = f"expected rgb [B, {spec.in_chans}, H, W] and aux [B, {config.aux_channels}, H, W]"
        if rgb.ndim != 4 or aux.ndim != 4:
            raise ValueError(f"{expected}, got {shapes}")
        if rgb.shape[1] != spec.in_chans:
            raise ValueError(f"wrong RGB channel count: {expected}, got {shapes}")
        if aux.shape[1] != config.aux_channels:
            raise ValueError(
                f"wrong aux channel count: adapter {self.active_adapter!r} takes {config.aux_channels}; {expected}, got {shapes}"
            )
        if rgb.shape[0] != aux.shape[0] or rgb.shape[2:] != aux.shape[2:]:
            raise ValueError(f"rgb and aux must share batch and spatial size, got {shapes}")
        spec.check_image_size(rgb.shape[2], rgb.shape[3])

    # ----------------------------------------------------------- mixed batches
    def forward_mixed(self, rgb: torch.Tensor, aux: torch.Tensor | Sequence[torch.Tensor],
                      adapter_names: Sequence[str]) -> list[torch.Tensor]:
        """Many tasks in one batch: sample ``i`` runs under adapter ``adapter_names[i]``.

        ``rgb [B, 3, H, W]``; ``aux`` one tensor ``[B, C, H, W]`` when the named adapters
        share ``C``, else a list of ``B`` tensors ``[C_i, H, W]``. Returns ``B`` logits
        ``[K_i, H, W]``, each from its sample's adapter's head. The frozen blocks run once
        over the whole batch; before each block, every adapter with a prompter there prompts
        its own samples (adapters with other intervals prompt other blocks). The result equals
        running each sample alone under its adapter, up to the rounding of batched products.
        Raises ``KeyError`` (unknown adapter) or ``ValueError`` (a length or shape that does
        not fit) naming the sample and its adapter, and ``RuntimeError`` in training mode.
        """
        if self.training:
            raise RuntimeError(
                "forward_mixed is inference only: call segmenter.eval() first. In training mode each adapter's "
                "Gumbel noise and BatchNorm batch statistics would depend on which other tasks share the batch, "
                "and only the active adapter trains; train one task at a time with set_adapter() and forward()"
            )
        names = self._check_mixed(rgb, aux, adapter_names)
        groups: dict[str, list[int]] = {}
        for index, name in enumerate(names):
            groups.setdefault(name, []).append(index)
        batch = rgb.shape[0]
        routes = []
        for name, indices in groups.items():
            samples = None if len(indices) == batch else torch.tensor(indices, device=rgb.device)
            if isinstance(aux, torch.Tensor):
                group_aux = aux if samples is None else aux[samples]
            else:
                group_aux = torch.stack([aux[i] for i in indices])  # [n, C, H, W]
            adapter = self.adapters[name]
            routes.append(Route(adapter, samples, adapter.initial_state(group_aux)))
        features = self._prompted_features(rgb, routes)  # [B, D, h, w]
        outputs: list[torch.Tensor | None] = [None] * batch
        for indices, route in zip(groups.values(), routes):
            group = features if route.samples is None else features[route.samples]  # [n, D, h, w]
            logits = self.upsample(route.adapter.head(group), rgb.shape[-2:])  # [n, K, H, W]
            for index, sample_logits in zip(indices, logits):
                outputs[index] = sample_logits
        return outputs

    def _check_mixed(self, rgb: torch.Tensor, aux: torch.Tensor | Sequence[torch.Tensor],
                     adapter_names: Sequence[str]) -> list[str]:
        spec = self.spec
        if not isinstance(rgb, torch.Tensor) or rgb.ndim != 4 or rgb.shape[1] != spec.in_chans:
            raise ValueError(f"expected rgb [B, {spec.in_chans}, H, W], got {_shape(rgb)}")
        batch, size = rgb.shape[0], tuple(rgb.shape[2:])
        if isinstance(adapter_names, str) or not isinstance(adapter_names, Sequence):
            raise ValueError(f"adapter_names must be a list of B adapter names, got {adapter_names!r}")
        names = list(adapter_names)
        if len(names) != batch:
            raise ValueError(f"{len(names)} adapter names for a batch of {batch} samples: give one name per sample")
        for index, name in enumerate(names):
            if name not in self.adapters:
                raise KeyError(f"sample {index}: no adapter named {name!r}; adapters: {list(self.adapters)}")
        if isinstance(aux, torch.Tensor):
            if aux.ndim != 4 or aux.shape[0] != batch or tuple(aux.shape[2:]) != size:
                raise ValueError(f"expected aux [{batch}, C, {size[0]}, {size[1]}] like rgb {_shape(rgb)} (or a list "
                                 f"of {batch} tensors [C_i, H, W]), got {_shape(aux)}")
            samples = [aux[index] for index in range(batch)]
        elif isinstance(aux, Sequence) and len(aux) == batch:
            samples = list(aux)
        else:
            raise ValueError(f"aux must be a tensor [B, C, H, W] or a list of B={batch} tensors [C_i, H, W], got "
                             f"{type(aux).__name__}" + (f" of length {len(aux)}" if isinstance(aux, Sequence) else ""))
        for index, (name, sample) in enumerate(zip(names, samples)):
            channels = self.adapters[name].config.aux_channels
            if not isinstance(sample, torch.Tensor) or sample.ndim != 3 or tuple(sample.shape[1:]) != size:
                raise ValueError(f"sample {index} (adapter {name!r}): expected aux [{channels}, {size[0]}, {size[1]}], "
                                 f"got {_shape(sample)}")
            if sample.shape[0] != channels:
                hint = "" if not isinstance(aux, torch.Tensor) else \
                    "; for adapters with different aux channels pass aux as a list of tensors [C_i, H, W]"
                raise ValueError(f"sample {index}: adapter {name!r} takes {channels} aux channel(s), its aux has "
                                 f"{sample.shape[0]}{hint}")
        spec.check_image_size(*size)
        return names

    # ------------------------------------------------------------ train/eval
    def train(self, mode: bool = True) -> "GoptSegmenter":
        """Adapters follow ``mode``; the frozen backbone always stays in eval mode."""
        super().train(mode)
        if "backbone" in self._modules:
            self.backbone.eval()
        return self

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute the frozen blocks in backward (prompters run once) to save memory."""
        for block in self.backbone.blocks:
            block.checkpoint = enable

    # -------------------------------------------------------------- adapters
    @property
    def active_adapter(self) -> str:
        return self._active

    @property
    def adapter(self) -> GoptAdapter:
        """The active adapter."""
        return self.adapters[self._active]

    @property
    def config(self) -> GoptConfig:
        """Config of the active adapter."""
        return self.adapter.config

    def get_adapter(self, name: str | None = None) -> GoptAdapter:
        name = self._active if name is None else name
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r}; adapters: {list(self.adapters)}")
        return self.adapters[name]

    def add_adapter(self, name: str, source: GoptConfig | str | os.PathLike,
                    allow_backbone_mismatch: bool = False) -> GoptAdapter:
        """Adds a task: a fresh adapter from a :class:`GoptConfig`, or a saved one from a file.

        The new adapter is not activated (see :meth:`set_adapter`); on failure nothing changes.
        """
        check_adapter_name(name)
        if name in self.adapters:
            raise ValueError(f"an adapter named {name!r} exists already; delete_adapter({name!r}) first")
        if isinstance(source, GoptConfig):
            adapter = GoptAdapter(source, self.spec)
        elif isinstance(source, (str, os.PathLike)):
            file = read_adapter_file(source)
            check_backbone(file, self.backbone_fingerprint(), allow_backbone_mismatch)
            adapter = adapter_from_file(file, self.spec)
        else:
            raise TypeError(f"source must be a GoptConfig or a path to an adapter file, got {type(source).__name__}")
        self._insert(name, adapter)
        return adapter

    def set_adapter(self, name: str) -> None:
        """Makes ``name`` the adapter used by forward; only it has trainable parameters."""
        self.get_adapter(name)
        for key, adapter in self.adapters.items():
            adapter.requires_grad_(key == name)
        self._active = name

    def delete_adapter(self, name: str) -> None:
        self.get_adapter(name)
        if name == self._active:
            raise ValueError(f"cannot delete the active adapter {name!r}; set_adapter() another one first")
        del self.adapters[name]

    def _insert(self, name: str, adapter: GoptAdapter) -> None:
        reference = next(iter(self.backbone.parameters()), None)
        if reference is not None:
            adapter.to(device=reference.device, dtype=reference.dtype if reference.is_floating_point() else None)
        adapter.requires_grad_(False)
        adapter.train(self.training)
        self.adapters[name] = adapter

    # -------------------------------------------------------- files & identity
    def backbone_fingerprint(self, refresh: bool = False) -> dict[str, Any]:
        """Backbone identity stored in adapter files.

        The SHA-256 of the frozen weights is computed once and reused for as long as no
        backbone tensor is replaced or modified, as far as tensor versions and a sample of
        every tensor's values tell (:func:`~gopt_adapter.backbone.weights_version`). An edit
        through ``.data`` that misses every sampled element goes unseen: after editing the
        frozen weights by hand, pass ``refresh=True`` once (a full hash, ~0.25 s for ViT-B).
        """
        version = weights_version(self.backbone)
        if refresh or self._digest_cache is None or self._digest_cache[0] != version:
            self._digest_cache = (version, weights_digest(self.backbone))
        return fingerprint(self.spec, self._digest_cache[1])

    def save_pretrained(self, directory: str | os.PathLike, adapter_name: str | None = None,
                        dtype: torch.dtype | None = None) -> Path:
        """PEFT-style directory: ``adapter_config.json`` + ``adapter_model.safetensors``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        adapter = self.get_adapter(adapter_name)
        save_adapter(self, directory / WEIGHTS_NAME, dtype=dtype, adapter_name=adapter_name)
        manifest = {
            "peft_type": "GOPT",
            "library_version": __version__,
            "config": adapter.config.to_dict(),
            "backbone": self.backbone_fingerprint(),
        }
        atomic_write_bytes(directory / CONFIG_NAME, (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        return directory

    @classmethod
    def from_adapter_file(cls, model: nn.Module, file: AdapterFile, adapter_name: str = DEFAULT_ADAPTER,
                          allow_backbone_mismatch: bool = False) -> "GoptSegmenter":
        """Wraps ``model`` with the adapter of a read :class:`AdapterFile` (weights and preprocessing).

        The name, the model and the file's fit to the backbone are all checked before the model
        is touched; on failure it is left exactly as it was.
        """
        check_adapter_name(adapter_name)
        check_unwrapped(model)
        spec = BackboneSpec.from_model(model)
        digest = weights_digest(model)
        check_backbone(file, fingerprint(spec, digest), allow_backbone_mismatch)
        adapter = adapter_from_file(file, spec)
        return cls(model, spec, adapter, adapter_name, weights_sha256=digest)

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike, adapter_name: str = DEFAULT_ADAPTER,
                        allow_backbone_mismatch: bool = False) -> "GoptSegmenter":
        """Wraps ``model`` with the adapter saved by :meth:`save_pretrained`; checks all first."""
        directory = Path(directory)
        file = read_adapter_file(directory / WEIGHTS_NAME)
        try:
            manifest = json.loads((directory / CONFIG_NAME).read_text())
            manifest_config = GoptConfig.from_dict(manifest["config"])
        except FileNotFoundError:
            raise AdapterError(f"{directory / CONFIG_NAME}: missing") from None
        except (ValueError, KeyError, TypeError) as exc:
            raise AdapterError(f"{directory / CONFIG_NAME}: invalid ({exc})") from None
        if manifest_config != file.config:
            raise AdapterError(f"{directory}: {CONFIG_NAME} and {WEIGHTS_NAME} disagree on the config")
        return cls.from_adapter_file(model, file, adapter_name, allow_backbone_mismatch)

    def extra_repr(self) -> str:
        return f"active_adapter={self._active!r}"


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


def check_adapter_name(name: str) -> None:
    """Raises ``ValueError`` unless ``name`` can key an adapter (a non-empty string without '.')."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter name must be a non-empty string without '.', got {name!r}")


def check_unwrapped(model: nn.Module) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_gopt needs a timm model (nn.Module), got {type(model).__name__}")
    if is_wrapped(model):
        raise ValueError("this model already has GoPT applied; use segmenter.add_adapter() for another task")


def apply_gopt(model: nn.Module, aux_channels: int, num_classes: int, interval: int = 1,
               **options: Any) -> GoptSegmenter:
    """Turns a pretrained timm ViT into a frozen-backbone RGB-X segmenter with GoPT prompters.

    ``options`` are the remaining :class:`GoptConfig` fields (``hidden_dim``, ``num_groups``,
    ``assignment``, ``tau``, ``use_cup``, ``use_acp``, ``head``, ``head_channels``). Everything
    is validated before the model is changed. The returned segmenter computes exactly the
    frozen model's features until training moves the (zero-initialised) up-projections.
    """
    config = GoptConfig.from_options(aux_channels, num_classes, interval, **options)
    check_unwrapped(model)
    spec = BackboneSpec.from_model(model)
    adapter = GoptAdapter(config, spec)
    return GoptSegmenter(model, spec, adapter)


def remove_gopt(segmenter: GoptSegmenter) -> nn.Module:
    """Gives back the original timm model: module tree, keys, ``requires_grad`` flags and the
    train/eval mode of every submodule as they were when GoPT was applied.

    The segmenter is unusable afterwards.
    """
    if "backbone" not in segmenter._modules:
        raise ValueError("GoPT was already removed from this segmenter")
    model = segmenter.backbone
    unwrap_blocks(model)
    original = segmenter._original
    for name, param in model.named_parameters():
        param.requires_grad_(original["requires_grad"][name])
    if original["grad_checkpointing"] is not None:
        model.grad_checkpointing = original["grad_checkpointing"]
    for name, module in model.named_modules():
        module.training = original["training"][name]
    del segmenter._modules["backbone"]
    return model


__all__ = ["GoptSegmenter", "apply_gopt", "remove_gopt", "PromptedBlock"]
