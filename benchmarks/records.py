"""Resumable benchmark records: one JSON file a finished run, reused only when it was made
with exactly the same settings (``benchmarks.field``, ``benchmarks.ablation``,
``benchmarks.robustness``).

A record holds the :func:`fingerprint` of what made it; a benchmark started again with the
same output folder reuses the records whose fingerprint matches its own settings
(:func:`cached`) and trains the rest again, so changing a setting never mixes old runs
into new tables.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from gopt_adapter.train.engine import json_safe
from gopt_adapter.atomic_files import atomic_write_bytes
from gopt_adapter.version import __version__


#: Settings that change where a run logs, not what it computes: left out of fingerprints, so
#: records made before they existed stay valid.
LOGGING_ONLY = frozenset({"logger"})


def _results_settings(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _results_settings(item) for key, item in value.items() if key not in LOGGING_ONLY}
    return value


def fingerprint(settings: dict[str, Any], seed: int) -> str:
    """What makes two runs the same run: the settings (JSON; logging-only ones left out), the
    seed and the library version."""
    blob = json.dumps({"settings": _results_settings(settings), "seed": seed, "version": __version__}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Writes ``data`` to ``path`` as indented standard JSON (NaN as null, as every results file
    of the library), atomically: a record that exists is complete."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(Path(path), (json.dumps(json_safe(data), indent=2, allow_nan=False) + "\n").encode())


def cached(path: Path, settings: dict[str, Any], seed: int) -> dict[str, Any] | None:
    """The record at ``path`` if it was made with exactly these settings, else ``None`` (one
    line to stderr when a record is there but was made otherwise, or before fingerprints)."""
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    if record.get("fingerprint") != fingerprint(settings, seed):
        print(f"{path.parent.name}/{path.name}: made under other settings, training it again", file=sys.stderr)
        return None
    return record
