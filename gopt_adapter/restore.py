"""Rebuilding the segmenter an adapter file was trained as: its backbone from the file plus weights.

An adapter file records the timm model name and ``create_model`` kwargs of its backbone
(``timm_model`` metadata) and the fingerprint of the frozen weights. :func:`backbone_for_adapter`
builds that backbone again from the file and the user's weights file, so commands need only
``--weights`` (``--backbone`` / kwargs stay available as overrides, and for files written
before the name was recorded); :func:`restore_segmenter` wraps it with the adapter, refusing
weights whose fingerprint differs. ``gopt predict``, ``gopt eval`` (and any later command that
needs the trained model) go through these two functions.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_io import AdapterError, AdapterFile, read_adapter_file
from .backbone import create_backbone
from .model import GoptSegmenter

__all__ = ["BackboneBuildError", "backbone_for_adapter", "restore_segmenter"]


class BackboneBuildError(ValueError):
    """The backbone cannot be built: unknown name, unusable kwargs, or weights that do not fit."""


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
        raise AdapterError(f"{file.path}: the adapter file records no timm model name (written by gopt-adapter "
                           f"{file.library_version}); give the backbone's name")
    kwargs = backbone_kwargs if backbone_kwargs is not None else dict(file.backbone_kwargs or {})
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
