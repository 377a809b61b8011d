"""Measured tables written into the docs in place: each between markers, the prose around kept."""

from __future__ import annotations

import math
import statistics
import sys
from pathlib import Path
from typing import Sequence

from gopt_adapter.atomic_files import atomic_write_bytes


def mean_std(values: list[float | None]) -> str:
    """``"mean ± std"`` of fractions, in percent with one decimal; values that are ``None`` or
    NaN (a class never seen) are left out, ``"-"`` when none is left."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):.1f} ± {100 * std:.1f}"


def invocation(module: str, argv: Sequence[str] | None) -> str:
    """The command line that ran ``module`` (``argv`` as given to ``main``, else ``sys.argv``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    return " ".join([f"python -m {module}", *args])


def write_section(doc: str | Path, key: str, command: str, body: str) -> None:
    """Puts ``command`` and ``body`` between the markers named ``key`` in ``doc``.

    The section replaces the one with the same markers, or is appended; everything else in
    the file (a title, the discussion of the numbers) stays as it is.
    """
    doc = Path(doc)
    begin, end = f"<!-- {key} begin -->", f"<!-- {key} end -->"
    section = f"{begin}\n```\n{command}\n```\n\n{body.rstrip()}\n{end}"
    text = doc.read_text() if doc.exists() else ""
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + ("\n\n" if text.strip() else "") + section + "\n"
    atomic_write_bytes(doc, text.encode())
