"""Crash-safe file writes: a file holds either its old content or all of the new.

Adapters, checkpoints, logs, results, weights and the WHU tile index are all written this
way, so an interrupted job never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save as save_safetensors

from .numerics import check_finite


def _umask() -> int:
    """The process umask, read without changing it where Linux allows (no window in which
    another thread would create files with a zero umask)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Writes ``data`` so that ``path`` holds either its old content or all of ``data``.

    The file gets the mode of the file it replaces, or else ``0o666 & ~umask`` like any file
    created with ``open`` (``mkstemp`` alone would leave it private, 0600).
    """
    path = Path(path)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def tensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    """A state dict as safetensors bytes (tensors detached, moved to the CPU, made contiguous).

    Raises :class:`~gopt_adapter.numerics.NonFiniteTensorError` naming the tensors that hold
    NaN or inf values: weights like that are never written.
    """
    check_finite(tensors)
    return save_safetensors({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def write_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> None:
    """Writes a state dict as one safetensors file, atomically."""
    atomic_write_bytes(path, tensors_bytes(tensors))
