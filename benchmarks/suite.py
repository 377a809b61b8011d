"""Assembles the paper's Tables 1-4 and Fig. 6/7 from ``results.json`` files, ours beside the paper's.

    python -m benchmarks.suite --results runs/ --out docs/tables.md

Every ``results.json`` under ``--results`` (written by ``benchmarks.run``) belongs to one group
keyed by (dataset, backbone, class setting, variant); several runs of one key (seeds) are
averaged and counted, runs that differ in backbone or classes never are. Each table is shown
once per backbone, with one column group per class setting of a dataset. Cells show
``ours (paper, gap)`` in percent, the paper's number only for its backbone (ViT-B); ``-``
where we have no run, ``n/a`` where the runs have no value (a metric written as null).
The Fig. 6 (prompter interval) and Fig. 7 (hard vs soft) tables appear when such runs exist.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gopt_adapter.data import MFNET_CLASSES, NYUDV2_CLASSES, PST900_CLASSES, SUNRGBD_CLASSES, WHU_OPT_SAR_CLASSES

METRIC_KEYS = {"PAcc": "pixel_acc", "mAcc": "mean_acc", "mIoU": "miou", "OA": "oa", "AA": "aa", "Kappa": "kappa"}
#: Backbones the paper's numbers were measured with (MAE ViT-B/16, no constructor overrides).
PAPER_BACKBONES = frozenset({"vit_base_patch16_224.mae", "vit_base_patch16_224"})
DEFAULT_BACKBONE = "vit_base_patch16_224.mae"
#: Every class of a dataset; a run that leaves some out (WHU background/others, MFNet unlabeled) is its own setting.
FULL_CLASSES: dict[str, tuple[str, ...]] = {
    "nyudv2": NYUDV2_CLASSES, "sunrgbd": SUNRGBD_CLASSES, "mfnet": MFNET_CLASSES, "pst900": PST900_CLASSES,
    "whu_opt_sar": WHU_OPT_SAR_CLASSES,
}
#: Metrics the paper reports per dataset (used for the figure tables).
DATASET_METRICS: dict[str, tuple[str, ...]] = {
    "nyudv2": ("PAcc", "mAcc", "mIoU"), "sunrgbd": ("PAcc", "mAcc", "mIoU"), "mfnet": ("mAcc", "mIoU"),
    "pst900": ("mIoU",), "whu_opt_sar": ("OA", "AA", "Kappa"), "synthetic": ("mIoU",),
}


@dataclass(frozen=True, order=True)
class RunKey:
    """What makes runs comparable: averaged together only when all four agree."""

    dataset: str
    backbone: str  # timm name, plus its constructor overrides if any
    classes: str  # class setting, e.g. "8 classes" or "6 classes, without background, others"
    variant: str


@dataclass(frozen=True)
class Column:
    dataset: str
    metric: str  # one of METRIC_KEYS


@dataclass(frozen=True)
class Row:
    label: str
    variants: tuple[str, ...]  # runs of these variants are pooled (identical models under two names)
    paper: tuple[float | None, ...]  # one per column


@dataclass(frozen=True)
class Table:
    title: str
    columns: tuple[Column, ...]
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Figure:
    """A table over the datasets that have runs of ``markers`` (the paper shows these as plots)."""

    title: str
    rows: tuple[tuple[str, tuple[str, ...]], ...]  # (label, pooled variants)
    markers: frozenset[str]


def _cols(dataset: str, *metrics: str) -> tuple[Column, ...]:
    return tuple(Column(dataset, m) for m in metrics)


def _row(label: str, variant: str, paper: tuple[float | None, ...]) -> Row:
    return Row(label, (variant,), paper)


#: The two readings of eq. 12 (ACP's query), labelled wherever a GoPT row is shown (docs/method.md).
GOPT_OURS = "GoPT (ACP query ours: RGB + aux token)"
GOPT_PRINTED = "GoPT (ACP query as printed: RGB token)"
QUERY_NOTE = (f"Every GoPT row but \"{GOPT_PRINTED}\" (`gopt_rgb_query`) uses our reading of eq. 12: ACP queries "
              "with the RGB token plus its aligned aux token; the printed eq. 12 queries with the RGB token alone "
              "(docs/method.md).")
_T4 = _cols("nyudv2", "PAcc", "mAcc", "mIoU") + _cols("mfnet", "mAcc", "mIoU") + _cols("whu_opt_sar", "OA", "AA", "Kappa")
TABLES = (
    Table("Table 1: RGB-D (NYUDv2, SUN RGB-D)",
          _cols("nyudv2", "PAcc", "mAcc", "mIoU") + _cols("sunrgbd", "PAcc", "mAcc", "mIoU"),
          (_row("Foundation (SETR)", "foundation", (76.9, 61.1, 49.3, 82.7, 59.3, 48.9)),
           _row("GoPT (B)", "gopt", (79.8, 67.5, 54.1, 85.7, 64.2, 52.1)))),
    Table("Table 2: RGB-T (MFNet, PST900)",
          _cols("mfnet", "mAcc", "mIoU") + _cols("pst900", "mIoU"),
          (_row("GoPT (B)", "gopt", (77.1, 57.4, 81.3)),)),
    Table("Table 3: RGB-SAR (WHU-OPT-SAR)",
          _cols("whu_opt_sar", "OA", "AA", "Kappa"),
          (_row("GoPT (B)", "gopt", (72.9, 69.3, 60.7)),)),
    Table("Table 4: variants and ablations", _T4, (
        _row("Foundation", "foundation", (76.9, 61.1, 49.3, 72.8, 54.6, 68.1, 65.2, 56.5)),
        _row("FFT (two streams, CEN exchange)", "fft", (78.5, 65.4, 53.1, 74.9, 56.3, 70.8, 68.3, 58.9)),
        _row("FFT-early (one stream, not in paper)", "fft_early", (None,) * 8),
        _row("VPT-Shallow", "vpt_shallow", (77.0, 61.9, 50.2, 73.2, 54.5, 68.4, 65.7, 57.1)),
        _row("VPT-Deep", "vpt_deep", (78.3, 64.2, 52.8, 74.1, 55.7, 69.8, 67.0, 58.3)),
        _row("GoPT-Shallow", "gopt_shallow", (78.1, 65.0, 52.9, 74.5, 56.0, 70.3, 67.5, 58.1)),
        _row(GOPT_OURS, "gopt", (79.8, 67.5, 54.1, 77.1, 57.4, 72.9, 69.3, 60.7)),
        _row(GOPT_PRINTED, "gopt_rgb_query", (None,) * 8),
        _row("GoPT (w/o ACP)", "gopt_no_acp", (78.6, 65.4, 53.7, 75.3, 56.4, 70.9, 67.8, 58.4)),
        _row("GoPT (w/o CUP)", "gopt_no_cup", (78.5, 65.7, 53.9, 75.6, 56.8, 71.2, 67.9, 58.3)),
        _row("LoRA (peft, not in paper)", "lora", (None,) * 8),
    )),
)
_INTERVALS = (1, 2, 4, 6, 12)
FIGURES = (
    Figure("Fig. 6: a grouping prompter every N blocks",
           tuple((f"every {n} block{'s' * (n > 1)}", (f"gopt_i{n}", *{1: ("gopt",), 12: ("gopt_shallow",)}.get(n, ())))
                 for n in _INTERVALS),
           frozenset(f"gopt_i{n}" for n in _INTERVALS)),
    Figure("Fig. 7: hard vs soft group assignment",
           (("hard (gopt)", ("gopt",)), ("soft (gopt_soft)", ("gopt_soft",))),
           frozenset({"gopt_soft"})),
)


# ------------------------------------------------------------------ reading runs
def backbone_label(config: dict[str, Any]) -> str:
    kwargs = config.get("backbone_kwargs") or {}
    return config["backbone"] + (f" {json.dumps(kwargs, sort_keys=True)}" if kwargs else "")


def class_setting(dataset: str, class_names: list[str]) -> str:
    full = FULL_CLASSES.get(dataset)
    label = f"{len(class_names)} classes"
    if full is None or tuple(class_names) == tuple(full):
        return label
    dropped = [name for name in full if name not in class_names]
    return f"{label}, without {', '.join(dropped)}" if dropped else label


def run_key(record: dict[str, Any], path: Path) -> RunKey:
    try:
        config = record["config"]
        return RunKey(config["dataset"], backbone_label(config), class_setting(config["dataset"], record["class_names"]),
                      config["variant"])
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a benchmarks.run record (no {exc})") from None


def collect(results_dir: Path) -> dict[RunKey, list[dict]]:
    runs: dict[RunKey, list[dict]] = {}
    for path in sorted(results_dir.rglob("results.json")):
        record = json.loads(path.read_text())
        key = run_key(record, path)
        if not record.get("metrics"):
            print(f"warning: {path} has no metrics: finish or re-report the run with --resume", file=sys.stderr)
        runs.setdefault(key, []).append(record)
    return runs


# ------------------------------------------------------------------ rendering
def _cell(records: list[dict], column: Column, paper: float | None) -> str:
    if not records:
        return "-" if paper is None else f"- ({paper:.1f})"
    found = [r.get("metrics", {}).get(METRIC_KEYS[column.metric]) for r in records]
    values = [100 * v for v in found if v is not None]
    if not values:
        return "n/a" if paper is None else f"n/a ({paper:.1f})"
    ours = statistics.fmean(values)
    spread = f"±{statistics.stdev(values):.1f}" if len(values) > 1 else ""
    if paper is None:
        return f"{ours:.1f}{spread}"
    return f"{ours:.1f}{spread} ({paper:.1f}, {ours - paper:+.1f})"


def _figure_table(figure: Figure, runs: dict[RunKey, list[dict]]) -> Table | None:
    datasets = sorted({key.dataset for key in runs if key.variant in figure.markers})
    if not datasets:
        return None
    columns = tuple(Column(d, m) for d in datasets for m in DATASET_METRICS.get(d, ("mIoU",)))
    return Table(figure.title, columns, tuple(Row(label, variants, (None,) * len(columns))
                                              for label, variants in figure.rows))


def _render_table(table: Table, runs: dict[RunKey, list[dict]]) -> list[str]:
    datasets = {c.dataset for c in table.columns}
    variants = {v for row in table.rows for v in row.variants}
    relevant = [key for key in runs if key.dataset in datasets and key.variant in variants]
    lines = []
    for backbone in sorted({key.backbone for key in relevant}) or [DEFAULT_BACKBONE]:
        paper_shown = backbone in PAPER_BACKBONES
        # one column group per class setting of each dataset ("" when there is no run to say it)
        settings = {d: sorted({k.classes for k in relevant if k.dataset == d and k.backbone == backbone}) or [""]
                    for d in datasets}
        columns = [(i, column, classes) for i, column in enumerate(table.columns) for classes in settings[column.dataset]]
        note = "cells: ours (paper, gap), percent" if paper_shown else "cells: ours, percent (the paper's are for ViT-B)"
        lines += [f"### {table.title}: backbone {backbone}", "", note, ""]
        lines.append("| method | params | " + " | ".join(
            f"{c.dataset} {c.metric}" + (f" ({classes})" if classes else "") for _, c, classes in columns) + " |")
        lines.append("|---|---|" + "---|" * len(columns))
        for row in table.rows:
            cells, params = [], set()
            for index, column, classes in columns:
                records = [r for v in row.variants for r in runs.get(RunKey(column.dataset, backbone, classes, v), [])]
                params |= {r["trainable_parameters"] for r in records}
                cells.append(_cell(records, column, row.paper[index] if paper_shown else None))
            shown = "/".join(f"{p / 1e6:.2f}M" for p in sorted(params)) or "-"
            lines.append(f"| {row.label} | {shown} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def render(runs: dict[RunKey, list[dict]]) -> str:
    tables = [*TABLES, *filter(None, (_figure_table(figure, runs) for figure in FIGURES))]
    return "\n".join([QUERY_NOTE, "", *(line for table in tables for line in _render_table(table, runs))])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default="runs", type=Path, help="folder searched for results.json files")
    parser.add_argument("--out", type=Path, help="also write the tables to this Markdown file")
    args = parser.parse_args(argv)
    try:
        text = render(collect(args.results))
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
