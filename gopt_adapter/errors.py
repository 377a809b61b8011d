"""The errors gopt-adapter raises on purpose, one type per thing that went wrong.

Callers dispatch on these types, never on a message's wording: ``gopt`` maps each to its
advice (:mod:`gopt_adapter.cli.commands`), and rewording a message changes no behaviour. Each
also derives from the built-in exception a caller would have caught before (``ValueError``,
``RuntimeError``), so ``except ValueError`` keeps working.

A leaf module: it imports nothing, so every layer can raise these.
"""

from __future__ import annotations

__all__ = [
    "AdapterError",
    "AdapterNotFoundError",
    "BackboneBuildError",
    "BackboneMismatchError",
    "BackboneUnnamedError",
    "CheckpointError",
    "GoptError",
    "ImageReadError",
    "ImageSizeMismatchError",
    "NonFiniteError",
    "NonFiniteTensorError",
    "UsageError",
    "WeightsMismatchError",
]


class GoptError(Exception):
    """Base of every error below."""


# ------------------------------------------------------------------ adapter files and backbones
class AdapterError(GoptError, ValueError):
    """An adapter file that cannot be used: unreadable, corrupt, or made for something else."""


class AdapterNotFoundError(AdapterError):
    """No adapter file at the given path."""


class BackboneMismatchError(AdapterError):
    """The adapter was made for another backbone architecture (embedding width, depth, patch,
    prefix tokens): its tensors or config do not fit this one."""


class WeightsMismatchError(AdapterError):
    """The backbone fits, but its frozen weights are not those the adapter was trained on (their
    fingerprint differs); ``allow_backbone_mismatch=True`` runs anyway.

    ``what`` is the finding alone, for callers that give their own advice (the CLI's flag).
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what}; pass allow_backbone_mismatch=True to load anyway")


class BackboneUnnamedError(AdapterError):
    """The adapter file records no timm model name (files of early versions), and none was given."""


class BackboneBuildError(GoptError, ValueError):
    """timm cannot build the backbone: unknown name, unusable kwargs, or weights that do not fit."""


# ------------------------------------------------------------------ images
class ImageReadError(GoptError, ValueError):
    """An image file that cannot be decoded."""


class ImageSizeMismatchError(GoptError, ValueError):
    """The modalities of one sample (RGB, aux, label) differ in size."""


# ------------------------------------------------------------------ training
class UsageError(GoptError):
    """Settings or flags of a run that cannot work, found before any work starts."""


class CheckpointError(GoptError, ValueError):
    """A checkpoint that cannot be resumed by this run (other model, other settings)."""


class NonFiniteError(GoptError, RuntimeError):
    """Training stopped: ``max_nonfinite_steps`` optimizer steps in a row had a non-finite loss
    or gradients. The checkpoint of the last completed epoch is left as it was."""


class NonFiniteTensorError(GoptError, ValueError):
    """Tensors holding NaN or inf values, refused before anything was written."""
