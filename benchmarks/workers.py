"""Where the benchmarks train their runs: spawned worker processes, or the calling process.

``worker_pool(n)`` is a :class:`concurrent.futures.Executor`: for ``n >= 2`` a pool of ``n``
spawned processes (spawn: no fork of a process that has torch threads); for ``n == 1`` the
calling process itself, each job run when it is submitted. A run sets its own threads and seeds,
so where it runs does not change its record; one worker just skips a process's start-up (a
``torch`` and ``timm`` import, seconds) and keeps a failing run's traceback in this process.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from typing import Any, Callable

__all__ = ["InProcessExecutor", "worker_pool"]


class InProcessExecutor(Executor):
    """Runs each submitted call at once, in this process, and returns its finished future."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        future: Future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to the caller through the future, as a process pool does
            future.set_exception(exc)
        return future


def worker_pool(workers: int) -> Executor:
    """``workers`` spawned processes, or this process for one."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    if workers == 1:
        return InProcessExecutor()
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
