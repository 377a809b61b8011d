"""GoPT's segmenter: one frozen timm ViT shared by several task adapters, and their files.

:class:`GoptSegmenter` is the shared :class:`~gopt_adapter.segmenter.PromptedSegmenter`
forward plus what only GoPT adapters have: several tasks on one backbone (``add_adapter``,
``set_adapter``, mixed batches) and adapter files (:func:`save_adapter`, :func:`load_adapter`,
``save_pretrained`` / ``from_pretrained``), whose bytes :mod:`gopt_adapter.adapter_file` reads
and writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .adapter import GoptAdapter
from .errors import AdapterError, BackboneBuildError, BackboneMismatchError, BackboneUnnamedError
from .adapter_file import AdapterFile, check_backbone, check_tensors, encode_adapter, fingerprint, read_adapter_file
from .backbone import BackboneSpec, backbone_origin, create_backbone, weights_digest, weights_version
from .config import GoptConfig
from .atomic_files import atomic_write_bytes
from .inject import PromptedBlock, Route
from .segmenter import (
    DEFAULT_ADAPTER,
    PromptedSegmenter,
    SegmenterBase,
    check_adapter_name,
    check_unwrapped,
    remove_gopt,
)
from .version import __version__

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


class GoptSegmenter(PromptedSegmenter):
    """RGB-X segmenter with GoPT adapters: ``segmenter(rgb, aux) -> logits [B, num_classes, H, W]``.

    The backbone (``self.backbone``, the user's timm model with wrapped blocks) is frozen and
    stays in eval mode; only the active adapter in ``self.adapters`` trains. Several adapters
    (tasks) share the one backbone in memory. Build it with :func:`apply_gopt`.
    A forward pass keeps per-call state on the segmenter: do not run one segmenter from
    several threads at once.
    """

    def __init__(self, model: nn.Module, spec: BackboneSpec, adapter: GoptAdapter,
                 adapter_name: str = DEFAULT_ADAPTER, weights_sha256: str | None = None) -> None:
        super().__init__(model, spec, adapter, adapter_name)
        self._digest_cache = (weights_version(model), weights_sha256) if weights_sha256 else None

    # ------------------------------------------------------- aux-missing mode
    def forward(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """``rgb [B, 3, H, W]`` and ``aux [B, C_aux, H, W]`` -> logits ``[B, K, H, W]``.

        Without an aux image (``aux=None``), or for the samples flagged in ``aux_missing``
        (bool ``[B]``; their aux values are not read), the adapter runs in its aux-missing
        mode: stand-in aux tokens, and its calibrated logit offsets
        (:func:`~gopt_adapter.calibration.calibrate_missing_mode`). Only adapters trained with
        ``aux_dropout > 0`` have one.
        """
        aux, missing = self._missing_aux_inputs(rgb, aux, aux_missing)
        logits = self.adapter.head(self._gopt_features(rgb, aux, missing))  # [B, K, h, w]
        return self.upsample(self.adapter.offset_missing_logits(logits, missing), rgb.shape[-2:])

    def features(self, rgb: torch.Tensor, aux: torch.Tensor | None = None,
                 aux_missing: torch.Tensor | None = None) -> torch.Tensor:
        """Last block's patch tokens after the backbone's final norm, ``[B, D, h, w]``."""
        return self._gopt_features(rgb, *self._missing_aux_inputs(rgb, aux, aux_missing))

    def _gopt_features(self, rgb: torch.Tensor, aux: torch.Tensor, missing: torch.Tensor | None) -> torch.Tensor:
        self._check_inputs(rgb, aux)
        adapter = self.adapter
        if adapter.missing_aux is None:
            state = adapter.initial_state(aux)
        else:  # training may drop any sample's aux: its stand-in tokens are made from its rgb
            state = adapter.initial_state(aux, missing, rgb)
        return self._prompted_features(rgb, [Route(adapter, None, state)])

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
        if self.adapter.missing_aux is None:
            raise ValueError(
                f"adapter {self.active_adapter!r} has no aux-missing mode (it was trained with aux_dropout=0, "
                "the default and the only setting of older adapter files): give every sample an aux image, or "
                "train an adapter with GoptConfig(aux_dropout > 0)"
            )
        if not isinstance(aux_missing, torch.Tensor) or aux_missing.dtype != torch.bool \
                or tuple(aux_missing.shape) != (aux.shape[0],):
            got = f"{aux_missing.dtype} {tuple(aux_missing.shape)}" if isinstance(aux_missing, torch.Tensor) \
                else type(aux_missing).__name__
            raise ValueError(f"aux_missing must be a bool tensor [B] = [{aux.shape[0]}], got {got}")
        return aux, aux_missing.to(aux.device)

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
        self._activate(name)

    def delete_adapter(self, name: str) -> None:
        self.get_adapter(name)
        if name == self._active:
            raise ValueError(f"cannot delete the active adapter {name!r}; set_adapter() another one first")
        del self.adapters[name]

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


def _shape(value: Any) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"


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


def adapter_from_file(file: AdapterFile, spec: BackboneSpec) -> GoptAdapter:
    """A new adapter built from the file's config and holding its weights and preprocessing."""
    try:
        adapter = GoptAdapter(file.config, spec)
    except ValueError as exc:
        raise BackboneMismatchError(f"{file.path}: config does not fit this backbone ({exc})") from None
    _load_checked(adapter, file)
    return adapter


def adapter_bytes(adapter: GoptAdapter, backbone: dict[str, Any], dtype: torch.dtype | None = None,
                  origin: dict[str, Any] | None = None) -> bytes:
    """The bytes of ``adapter``'s file for the backbone of fingerprint ``backbone`` (floating
    tensors cast to ``dtype``; ``origin`` as :func:`~gopt_adapter.backbone.backbone_origin` gives it)."""
    if not isinstance(adapter, GoptAdapter):
        raise TypeError(f"adapter files hold GoPT adapters, not {type(adapter).__name__}")
    return encode_adapter(adapter.config, adapter.state_dict(), backbone, preprocessing=adapter.preprocessing,
                          class_names=adapter.class_names, origin=origin, dtype=dtype)


def _gopt_segmenter(segmenter: Any, what: str, path: str | os.PathLike) -> GoptSegmenter:
    """``segmenter`` if it holds GoPT adapters; else an :class:`AdapterError` naming the baseline
    (a ``TypeError`` for what is no segmenter at all)."""
    if isinstance(segmenter, GoptSegmenter):
        return segmenter
    if not isinstance(segmenter, SegmenterBase):
        raise TypeError(f"{what} needs a GoptSegmenter (see apply_gopt), got {type(segmenter).__name__}")
    variant = getattr(segmenter.config, "variant", None)
    kind = f"the {variant!r} baseline" if variant else f"a {type(segmenter).__name__}"
    raise AdapterError(f"{path}: {what} handles GoPT adapter files only, and this segmenter is {kind}; keep its "
                       "weights with torch.save(segmenter.state_dict(), path) and segmenter.load_state_dict()")


def save_adapter(segmenter: GoptSegmenter, path: str | os.PathLike, dtype: torch.dtype | None = None,
                 adapter_name: str | None = None) -> Path:
    """Writes one adapter (the active one by default) to a single ``.safetensors`` file.

    Raises :class:`AdapterError` for a baseline's segmenter (its weights are not a GoPT adapter).
    """
    segmenter = _gopt_segmenter(segmenter, "save_adapter", path)
    adapter = segmenter.get_adapter(adapter_name)
    data = adapter_bytes(adapter, segmenter.backbone_fingerprint(), dtype, backbone_origin(segmenter.backbone))
    atomic_write_bytes(path, data)
    return Path(path)


def load_adapter(segmenter: GoptSegmenter, path: str | os.PathLike, adapter_name: str | None = None,
                 allow_backbone_mismatch: bool = False) -> None:
    """Loads a file's weights and preprocessing into an existing adapter (the active one by default).

    Everything is checked before the first weight is copied; on any failure the segmenter is
    left exactly as it was. The file's config must equal the adapter's; to load an adapter of
    another config as a new task, use ``segmenter.add_adapter(name, path)``. Raises
    :class:`AdapterError` for a baseline's segmenter.
    """
    segmenter = _gopt_segmenter(segmenter, "load_adapter", path)
    adapter = segmenter.get_adapter(adapter_name)
    file = read_adapter_file(path)
    check_backbone(file, segmenter.backbone_fingerprint(), allow_backbone_mismatch)
    if file.config != adapter.config:
        diffs = [
            f"{key}={value!r} (adapter has {getattr(adapter.config, key)!r})"
            for key, value in file.config.to_dict().items()
            if getattr(adapter.config, key) != value
        ]
        raise AdapterError(
            f"{file.path}: adapter config differs: {', '.join(diffs)}; "
            "use segmenter.add_adapter(name, path) to load it as another task"
        )
    _load_checked(adapter, file)


@torch.no_grad()
def _load_checked(adapter: GoptAdapter, file: AdapterFile) -> None:
    """Checks that the file's tensors fit, then copies them (cast to the adapter's dtype) in place.

    A direct copy into the live tensors: ``load_state_dict`` walks every submodule and costs
    more than the rest of a swap together.
    """
    state = adapter.state_dict(keep_vars=True)
    check_tensors(file, state)
    targets = list(state.values())
    sources = [file.tensors[name].to(target.device) for name, target in state.items()]  # no-op on the CPU
    torch._foreach_copy_(targets, sources)  # one call for every tensor; casts dtypes
    adapter.preprocessing = file.preprocessing
    adapter.class_names = file.class_names


__all__ = ["GoptSegmenter", "PromptedBlock", "apply_gopt", "backbone_for_adapter", "build_backbone", "load_adapter",
           "remove_gopt", "restore_segmenter", "save_adapter"]


# ------------------------------------------------------------------ rebuilt from a file
def backbone_for_adapter(file: AdapterFile, weights: str | os.PathLike | None = None, backbone: str | None = None,
                         backbone_kwargs: dict[str, Any] | None = None, pretrained: bool = False) -> nn.Module:
    """The timm backbone ``file`` was trained on, holding ``weights`` (else timm's pretrained
    weights with ``pretrained=True``, else random ones, which the fingerprint check refuses
    unless the adapter was trained on exactly those).

    ``backbone`` / ``backbone_kwargs`` override the recorded name / kwargs (``None``: recorded;
    a file that recorded no kwargs builds with none). Raises :class:`AdapterError` when the file
    records no name and none is given, :class:`BackboneBuildError` when timm cannot build it
    (``FileNotFoundError`` for a missing weights file).
    """
    name = backbone or file.backbone_name
    if name is None:
        raise BackboneUnnamedError(f"{file.path}: the adapter file records no timm model name (written by gopt-adapter "
                           f"{file.library_version}); give the backbone's name")
    return build_backbone(name, weights, backbone_kwargs if backbone_kwargs is not None else file.backbone_kwargs,
                          pretrained)


def build_backbone(name: str, weights: str | os.PathLike | None = None, backbone_kwargs: dict[str, Any] | None = None,
                   pretrained: bool = False) -> nn.Module:
    """:func:`~gopt_adapter.backbone.create_backbone` with timm's errors for a name, kwargs or
    weights that do not fit turned into one :class:`BackboneBuildError` naming all three
    (``FileNotFoundError`` for a missing weights file passes as it is)."""
    kwargs = dict(backbone_kwargs or {})
    try:
        return create_backbone(name, weights, kwargs, pretrained=pretrained)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as exc:  # timm's, for weights that do not fit
        first = " ".join(str(exc).split()) or type(exc).__name__
        first = first if len(first) <= 300 else first[:300] + " (...)"
        what = f"cannot build backbone {name!r} with kwargs {kwargs}" + (f" and weights {weights}" if weights else "")
        raise BackboneBuildError(f"{what}: {first}") from None


def restore_segmenter(adapter: str | os.PathLike | AdapterFile, weights: str | os.PathLike | None = None,
                      backbone: str | None = None, backbone_kwargs: dict[str, Any] | None = None,
                      allow_backbone_mismatch: bool = False, seed: int | None = None,
                      pretrained: bool = False) -> tuple[GoptSegmenter, AdapterFile]:
    """The trained segmenter (eval mode) of an adapter file: backbone rebuilt with
    :func:`backbone_for_adapter`, adapter weights, preprocessing and class names loaded.

    ``seed`` seeds torch before building, which reproduces a backbone trained from random
    initialisation with that seed (``gopt train --random-init``). The file and the fingerprint
    are checked before anything is wrapped; raises :class:`AdapterError` (wrong weights: the
    message says "trained on other backbone weights") or :class:`BackboneBuildError`.
    """
    file = adapter if isinstance(adapter, AdapterFile) else read_adapter_file(Path(adapter))
    if seed is not None:
        torch.manual_seed(seed)
    model = backbone_for_adapter(file, weights, backbone, backbone_kwargs, pretrained)
    segmenter = GoptSegmenter.from_adapter_file(model, file, allow_backbone_mismatch=allow_backbone_mismatch)
    return segmenter.eval(), file
