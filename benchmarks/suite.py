"""Assembles the paper's Tables 1-4 from ``results.json`` files, our numbers beside the paper's.

    python -m benchmarks.suite --results runs/ --out docs/tables.md

Every ``results.json`` under ``--results`` (written by ``benchmarks.run``) fills one cell
group keyed by (dataset, variant); several runs of one key (seeds) are averaged and counted.
Cells show ``ours (paper, gap)`` in percent; ``-`` where we have no run.
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass
from pathlib import Path

METRIC_KEYS = {"PAcc": "pixel_acc", "mAcc": "mean_acc", "mIoU": "miou", "OA": "oa", "AA": "aa", "Kappa": "kappa"}


@dataclass(frozen=True)
class Column:
    dataset: str
    metric: str  # one of METRIC_KEYS


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    rows: tuple[tuple[str, str, tuple[float | None, ...]], ...]  # (label, variant, paper values)


def _cols(dataset: str, *metrics: str) -> tuple[Column, ...]:
    return tuple(Column(dataset, m) for m in metrics)


_T4 = _cols("nyudv2", "PAcc", "mAcc", "mIoU") + _cols("mfnet", "mAcc", "mIoU") + _cols("whu_opt_sar", "OA", "AA", "Kappa")
TABLES = (
    Table("Table 1: RGB-D (NYUDv2, SUN RGB-D), GoPT-B",
          _cols("nyudv2", "PAcc", "mAcc", "mIoU") + _cols("sunrgbd", "PAcc", "mAcc", "mIoU"),
          (("Foundation (SETR)", "foundation", (76.9, 61.1, 49.3, 82.7, 59.3, 48.9)),
           ("GoPT (B)", "gopt", (79.8, 67.5, 54.1, 85.7, 64.2, 52.1)))),
    Table("Table 2: RGB-T (MFNet, PST900), GoPT-B",
          _cols("mfnet", "mAcc", "mIoU") + _cols("pst900", "mIoU"),
          (("GoPT (B)", "gopt", (77.1, 57.4, 81.3)),)),
    Table("Table 3: RGB-SAR (WHU-OPT-SAR), GoPT-B",
          _cols("whu_opt_sar", "OA", "AA", "Kappa"),
          (("GoPT (B)", "gopt", (72.9, 69.3, 60.7)),)),
    Table("Table 4: variants and ablations (GoPT-B)", _T4, (
        ("Foundation", "foundation", (76.9, 61.1, 49.3, 72.8, 54.6, 68.1, 65.2, 56.5)),
        ("FFT", "fft", (78.5, 65.4, 53.1, 74.9, 56.3, 70.8, 68.3, 58.9)),
        ("VPT-Shallow", "vpt_shallow", (77.0, 61.9, 50.2, 73.2, 54.5, 68.4, 65.7, 57.1)),
        ("VPT-Deep", "vpt_deep", (78.3, 64.2, 52.8, 74.1, 55.7, 69.8, 67.0, 58.3)),
        ("GoPT-Shallow", "gopt_shallow", (78.1, 65.0, 52.9, 74.5, 56.0, 70.3, 67.5, 58.1)),
        ("GoPT", "gopt", (79.8, 67.5, 54.1, 77.1, 57.4, 72.9, 69.3, 60.7)),
        ("GoPT (w/o ACP)", "gopt_no_acp", (78.6, 65.4, 53.7, 75.3, 56.4, 70.9, 67.8, 58.4)),
        ("GoPT (w/o CUP)", "gopt_no_cup", (78.5, 65.7, 53.9, 75.6, 56.8, 71.2, 67.9, 58.3)),
        ("LoRA (peft, not in paper)", "lora", (None,) * 8),
    )),
)


def collect(results_dir: Path) -> dict[tuple[str, str], list[dict]]:
    runs: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(results_dir.rglob("results.json")):
        record = json.loads(path.read_text())
        key = (record["config"]["dataset"], record["config"]["variant"])
        runs.setdefault(key, []).append(record)
    return runs


def _cell(records: list[dict], column: Column, paper: float | None) -> str:
    if not records:
        return "-" if paper is None else f"- ({paper:.1f})"
    values = [100 * r["metrics"][METRIC_KEYS[column.metric]] for r in records]
    ours = statistics.fmean(values)
    spread = f"±{statistics.stdev(values):.1f}" if len(values) > 1 else ""
    if paper is None:
        return f"{ours:.1f}{spread}"
    return f"{ours:.1f}{spread} ({paper:.1f}, {ours - paper:+.1f})"


def render(runs: dict[tuple[str, str], list[dict]]) -> str:
    lines = []
    for table in TABLES:
        lines += [f"### {table.title}", "", "cells: ours (paper, gap), percent", ""]
        lines.append("| method | params | " + " | ".join(f"{c.dataset} {c.metric}" for c in table.columns) + " |")
        lines.append("|---|---|" + "---|" * len(table.columns))
        for label, variant, paper in table.rows:
            cells = [_cell(runs.get((c.dataset, variant), []), c, p) for c, p in zip(table.columns, paper)]
            params = {r["trainable_parameters"] for c in table.columns for r in runs.get((c.dataset, variant), [])}
            shown = "/".join(f"{p / 1e6:.2f}M" for p in sorted(params)) or "-"
            lines.append(f"| {label} | {shown} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="runs", type=Path, help="folder searched for results.json files")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    text = render(collect(args.results))
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
