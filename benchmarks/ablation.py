"""The paper's Table 4 (variants and ablations), Fig. 6 (interval) and Fig. 7 (hard vs soft)
on the built-in synthetic world, on the CPU:

    python -m benchmarks.ablation --out runs/ablation --doc docs/results.md

For each world (``depth``, ``thermal``) and seed a small ViT is first pretrained on RGB alone
by the demo's path (:func:`gopt_adapter.demo.train_foundation`) with that seed: it is the
"pretrained foundation model" of that seed, shared by every row of the seed. Each variant
then starts from it and trains with the same seed, so the spread over seeds covers the
foundation's training as well as the adapter's (the world's scenes stay fixed); the table
reports mean and standard deviation over the seeds of the mIoU overall and on the classes
that only the auxiliary channel separates.

Runs go to two worker processes (one thread each, which beats one process with two threads
for a model this small). Every finished run leaves ``<out>/<world>/<variant>_s<seed>.json``,
every foundation ``<out>/<world>/foundation_vit_s<seed>.safetensors``; an interrupted job
started again with the same ``--out`` skips what is done.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch

from gopt_adapter.baselines import VARIANTS, build_variant
from gopt_adapter.calibration import calibrate_missing_mode
from gopt_adapter.demo import DemoConfig, build_foundation_backbone, class_miou, synthetic_datasets, train_foundation
from gopt_adapter.engine import Dist, TrainConfig, Trainer
from gopt_adapter.files import atomic_write_bytes
from gopt_adapter.parameters import count_parameters

from .markdown import invocation, mean_std, write_section
from .suite import TABLES

# Table 4 rows in the paper's order (GoPT with eq. 12 as printed beside ours), then the
# baseline it does not have, then the Fig. 6
# interval sweep on a 4-block backbone (gopt = interval 1, gopt_shallow = interval 4).
TABLE4 = ("foundation", "fft", "fft_early", "vpt_shallow", "vpt_deep", "gopt_shallow", "gopt", "gopt_rgb_query", "gopt_no_acp",
          "gopt_no_cup", "lora")
EXTRA = ("gopt_soft", "gopt_i2")
WORLDS = ("depth", "thermal")
PAPER_COLUMNS = {"depth": "nyudv2", "thermal": "mfnet"}  # the paper's dataset of the same pairing
SECTION = "ablation"  # markers of the generated part of docs/results.md
LABELS = {"gopt_soft": "GoPT, soft assignment", "gopt_i2": "GoPT, interval 2"}  # rows not in the suite's Table 4
_FROZEN = TrainConfig(epochs=16, batch_size=16, lr=3e-3, weight_decay=0.01, warmup_steps=10, amp=False,
                      eval_every=0, log_every=24, progress=False)


@dataclass(frozen=True)
class AblationConfig:
    """What the ablation trains: worlds, seeds, variants and the two training regimes.

    Backbones that train (``foundation``, ``fft``, ``fft_early``) fine-tune a pretrained model and get a
    lower learning rate than the frozen-backbone variants, whose prompters and head start
    from scratch; every variant sees the same data, steps and schedule otherwise.
    """

    worlds: tuple[str, ...] = WORLDS
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = TABLE4 + EXTRA
    demo: DemoConfig = DemoConfig(train_length=384, val_length=128)
    frozen: TrainConfig = _FROZEN
    full: TrainConfig = replace(_FROZEN, lr=5e-4)
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
        bad_worlds = sorted(set(self.worlds) - set(WORLDS))
        if bad_worlds:
            raise ValueError(f"unknown worlds {bad_worlds}; valid: {list(WORLDS)}")
        if not self.seeds or self.workers < 1:
            raise ValueError("need at least one seed and one worker")

    def train_config(self, variant: str, seed: int) -> TrainConfig:
        regime = self.frozen if VARIANTS[variant].frozen_backbone else self.full
        return replace(regime, seed=seed)


# ------------------------------------------------------------------------ runs
def foundation_weights(out: Path, world: str, seed: int) -> Path:
    """Where the RGB-only foundation of ``world`` pretrained with ``seed`` is kept."""
    return out / world / f"foundation_vit_s{seed}.safetensors"


def pretrain(config: AblationConfig, world: str, seed: int, weights: str) -> str:
    """Trains the RGB-only foundation of ``world`` with ``seed`` into ``weights`` (in a worker)."""
    torch.set_num_threads(1)
    demo = replace(config.demo, mode=world, out=str(Path(weights).with_suffix("")))
    train_foundation(demo, weights, progress=False, seed=seed)
    return weights


def train_run(config: AblationConfig, world: str, variant: str, seed: int, weights: str, work: Path):
    """Trains ``variant`` from the pretrained weights with ``seed`` (checkpoints under ``work``).

    An adapter with an aux-missing mode is then calibrated on the training set. Returns
    ``(model, final validation metrics, training set, validation set)``.
    """
    torch.set_num_threads(1)
    demo = replace(config.demo, mode=world)
    train, val = synthetic_datasets(demo)
    num_classes = len(train.class_names)
    torch.manual_seed(seed)  # adapter / head initialisation
    model = build_variant(variant, build_foundation_backbone(demo, weights), train.aux_channels, num_classes)
    metrics = Trainer(model, train, num_classes, config.train_config(variant, seed), work, val_set=val,
                      device="cpu", ctx=Dist()).fit()
    if getattr(model.config, "has_missing_mode", False):  # as the demo and gopt train do
        calibrate_missing_mode(model, train)
    return model, metrics, train, val


def miou_record(metrics: dict[str, Any], dataset) -> dict[str, float]:
    """mIoU overall, on the classes only aux separates, and on the others."""
    aux_classes = sorted(dataset.aux_dependent_classes)
    return {
        "miou": metrics["miou"],
        "miou_aux_classes": class_miou(metrics, aux_classes),
        "miou_rgb_classes": class_miou(metrics, [c for c in range(len(dataset.class_names)) if c not in aux_classes]),
    }


def finish_run(result: str | Path, world: str, variant: str, seed: int, model, train, start: float,
               **fields: Any) -> dict[str, Any]:
    """Writes a run's record (atomically: its presence marks the run done), drops its
    checkpoint, and returns the record: the run's identity, its size, ``fields``, the world's
    RGB-only bound and the wall time since ``start``."""
    record = {
        "world": world, "variant": variant, "seed": seed,
        "trainable_parameters": count_parameters(model).trainable,
        **fields,
        "rgb_only_bound": train.rgb_only_miou_bound,
        "wall_time_s": time.perf_counter() - start,
    }
    atomic_write_bytes(result, (json.dumps(record, indent=2) + "\n").encode())
    (Path(result).with_suffix("") / "checkpoint.pt").unlink(missing_ok=True)  # the record is what we keep
    return record


def run_one(config: AblationConfig, world: str, variant: str, seed: int, weights: str, result: str) -> dict[str, Any]:
    """Trains ``variant`` from the pretrained weights with ``seed``; writes and returns its record."""
    start = time.perf_counter()
    model, metrics, train, val = train_run(config, world, variant, seed, weights, Path(result).with_suffix(""))
    return finish_run(result, world, variant, seed, model, train, start, **miou_record(metrics, val),
                      **exchange_record(model))


def exchange_record(model) -> dict[str, Any]:
    """For the two-stream FFT, the channels each stream takes from the other after training,
    summed over its LayerNorms, of all their channels; nothing for other variants."""
    if not hasattr(model, "exchange_norms"):
        return {}
    norms = model.exchange_norms()
    masks = [norm.exchange_masks() for norm in norms]
    return {"exchanged_channels": {"rgb": sum(int(rgb.sum()) for rgb, _ in masks),
                                   "aux": sum(int(aux.sum()) for _, aux in masks),
                                   "of": sum(norm.weight.numel() for norm in norms), "layer_norms": len(norms)}}


def run_all(config: AblationConfig, out: Path, job: Callable[..., dict[str, Any]] = run_one,
            ) -> tuple[list[dict[str, Any]], int]:
    """Every (world, variant, seed) record, and how many came from an earlier invocation.

    ``job(config, world, variant, seed, weights, result)`` trains one run in a worker process and
    writes its record to ``result`` (a top-level function, so that it pickles).
    """
    records, todo, foundations = [], [], []
    for world in config.worlds:
        for seed in config.seeds:
            weights = foundation_weights(out, world, seed)
            if not weights.exists():
                foundations.append((world, seed, str(weights)))
            for variant in config.variants:
                result = out / world / f"{variant}_s{seed}.json"
                if result.exists():
                    records.append(json.loads(result.read_text()))
                else:
                    todo.append((world, variant, seed, str(weights), str(result)))
    print(f"{len(records)} runs done before, {len(todo)} to go on {config.workers} workers", file=sys.stderr)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")  # no fork of a process that has torch threads
    with ProcessPoolExecutor(config.workers, mp_context=context) as pool:
        needed = {(world, seed) for world, _, seed, _, _ in todo}  # a finished seed needs no foundation
        for done in as_completed([pool.submit(pretrain, config, *args) for args in foundations if args[:2] in needed]):
            print(f"foundation ready: {done.result()}", file=sys.stderr)
        futures = [pool.submit(job, config, *args) for args in todo]
        for done, future in enumerate(as_completed(futures), 1):
            record = future.result()
            records.append(record)
            elapsed = time.perf_counter() - start
            print(f"[{done}/{len(todo)}] {record['world']:7s} {record['variant']:13s} seed {record['seed']}: "
                  f"mIoU {record['miou']:.3f} (aux classes {record['miou_aux_classes']:.3f}), "
                  f"{elapsed:.0f} s elapsed, ~{elapsed / done * (len(todo) - done):.0f} s left", file=sys.stderr)
    return sorted(records, key=lambda r: (r["world"], r["seed"], r["variant"])), len(records) - len(todo)


# ---------------------------------------------------------------------- report
def _paper_table4() -> tuple[dict[str, str], dict[str, dict[str, float | None]]]:
    """Row labels and mIoU per variant and dataset of the paper's Table 4 (from benchmarks.suite)."""
    table = next(t for t in TABLES if t.title.startswith("Table 4"))
    labels = {variant: row.label for row in table.rows for variant in row.variants}
    mious = {
        variant: {column.dataset: value for column, value in zip(table.columns, row.paper) if column.metric == "mIoU"}
        for row in table.rows for variant in row.variants
    }
    return labels, mious


def setup(config: AblationConfig, records: list[dict[str, Any]], wall_s: float, reused: int = 0) -> str:
    """The paragraph that says how the runs of a synthetic-world benchmark were made."""
    bounds = {r["world"]: r["rgb_only_bound"] for r in records}
    return (
        f"Wall time of the command: {wall_s / 60:.1f} min on {config.workers} worker(s), 2 CPU cores"
        + (f" ({reused} runs found finished were not run again)." if reused else ".")
        + "\n\n"
        f"Backbone: `{config.demo.backbone}` with {config.demo.backbone_kwargs}, pretrained on RGB alone by the "
        f"demo's path once per seed, then each row of that seed trains from it, so the spread over seeds "
        f"includes the foundation's training (the scenes are the same for every seed). Data: {config.demo.train_length} training and "
        f"{config.demo.val_length} validation scenes at {config.demo.size}x{config.demo.size}. "
        f"Frozen-backbone rows: {config.frozen.epochs} epochs, batch {config.frozen.batch_size}, AdamW, "
        f"LR {config.frozen.lr:g}, polynomial decay; fine-tuned rows (Foundation, FFT, FFT-early): the same with LR "
        f"{config.full.lr:g}. Seeds {list(config.seeds)}; cells are mean ± standard deviation of mIoU in percent. "
        "\"aux\" is the mIoU over the classes that share their colour with another class and differ only "
        "in the auxiliary channel. Best mIoU reachable from RGB alone, by construction: "
        + ", ".join(f"{w} {100 * bounds[w]:.1f}" for w in config.worlds if w in bounds) + "."
    )


def report(config: AblationConfig, records: list[dict[str, Any]], wall_s: float, reused: int = 0) -> str:
    """Markdown: the settings, the Table 4 layout with our worlds as columns, then Fig. 6 and 7."""
    runs: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        runs.setdefault((record["world"], record["variant"]), []).append(record)
    labels, paper = _paper_table4()
    labels = {**labels, **LABELS}

    def cells(world: str, variant: str) -> list[str]:
        group = runs.get((world, variant), [])
        return [mean_std([r["miou"] for r in group]), mean_std([r["miou_aux_classes"] for r in group])]

    def params(variant: str) -> str:  # per world, in the column order (their class counts differ)
        counts = [next((f"{r['trainable_parameters']:,}" for r in runs.get((w, variant), [])), "-")
                  for w in config.worlds]
        return " / ".join(counts)

    lines = [
        setup(config, records, wall_s, reused),
        "",
        "### Table 4 layout: variants and ablations",
        "",
        f"| Method | Params ({' / '.join(config.worlds)}) | " + " | ".join(f"{w} mIoU | {w} aux" for w in config.worlds)
        + " | " + " | ".join(f"paper {PAPER_COLUMNS[w]} mIoU" for w in config.worlds) + " |",
        "|---|---:|" + "---:|---:|" * len(config.worlds) + "---:|" * len(config.worlds),
    ]
    for variant in config.variants:
        if variant in EXTRA:
            continue
        ours = [c for w in config.worlds for c in cells(w, variant)]
        theirs = [paper.get(variant, {}).get(PAPER_COLUMNS[w]) for w in config.worlds]
        lines.append(f"| {labels.get(variant, variant)} | {params(variant)} | " + " | ".join(ours) + " | "
                     + " | ".join("-" if v is None else f"{v:.1f}" for v in theirs) + " |")
    exchanged = [r for r in records if "exchanged_channels" in r]
    if exchanged:
        counts = "; ".join(f"{r['world']} seed {r['seed']}: RGB {r['exchanged_channels']['rgb']}, aux "
                           f"{r['exchanged_channels']['aux']}" for r in exchanged)
        first = exchanged[0]["exchanged_channels"]
        lines += ["", f"Two-stream FFT after training: channels each stream takes from the other, summed over its "
                  f"{first['layer_norms']} LayerNorms of {first['of']:,} channels per stream ({counts})."]
    sweep = [v for v in ("gopt", "gopt_i2", "gopt_shallow") if v in config.variants]
    lines += ["", "### Fig. 6 layout: interval between prompters (4-block backbone)", "",
              f"| interval | Params ({' / '.join(config.worlds)}) | " + " | ".join(f"{w} mIoU | {w} aux" for w in config.worlds) + " |",
              "|---:|---:|" + "---:|---:|" * len(config.worlds)]
    for variant, interval in zip(sweep, (1, 2, 4)):
        lines.append(f"| {interval} | {params(variant)} | "
                     + " | ".join(c for w in config.worlds for c in cells(w, variant)) + " |")
    lines += ["", "### Fig. 7 layout: hard vs soft assignment", "",
              "| assignment | " + " | ".join(f"{w} mIoU | {w} aux" for w in config.worlds) + " |",
              "|---|" + "---:|---:|" * len(config.worlds)]
    for variant, name in (("gopt", "hard (Gumbel, straight-through)"), ("gopt_soft", "soft")):
        if variant in config.variants:
            lines.append(f"| {name} | " + " | ".join(c for w in config.worlds for c in cells(w, variant)) + " |")
    return "\n".join(lines) + "\n"


def build_parser(prog: str, description: str, variants: tuple[str, ...], out: str) -> argparse.ArgumentParser:
    """The options of the synthetic-world benchmarks (this one and benchmarks.robustness)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=out, help="folder for the runs (resumable)")
    parser.add_argument("--doc", help="write the Markdown report here (e.g. docs/results.md)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(AblationConfig.seeds))
    parser.add_argument("--worlds", nargs="+", default=list(WORLDS), help=f"subset of {list(WORLDS)}")
    parser.add_argument("--variants", nargs="+", default=list(variants), help="subset of the rows")
    parser.add_argument("--epochs", type=int, default=AblationConfig.frozen.epochs, help="epochs of every row")
    parser.add_argument("--train-length", type=int, default=AblationConfig.demo.train_length,
                        help="training scenes per epoch")
    parser.add_argument("--val-length", type=int, default=AblationConfig.demo.val_length, help="validation scenes")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes (one thread each)")
    return parser


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    base = AblationConfig()
    return AblationConfig(
        worlds=tuple(args.worlds), seeds=tuple(args.seeds), variants=tuple(args.variants),
        demo=replace(base.demo, train_length=args.train_length, val_length=args.val_length),
        frozen=replace(base.frozen, epochs=args.epochs), full=replace(base.full, epochs=args.epochs),
        workers=args.workers,
    )


def run_benchmark(module: str, argv, parser: argparse.ArgumentParser, section: str,
                  job: Callable[..., dict[str, Any]], report_fn: Callable[..., str]) -> int:
    """Parses ``argv``, runs every missing run with ``job``, and writes the report into
    ``<out>/results.md``, the ``--doc`` file (between the ``section`` markers) and
    ``<out>/results.json``."""
    args = parser.parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records, reused = run_all(config, out, job)
    text = report_fn(config, records, time.perf_counter() - start, reused)
    command = invocation(module, argv)
    for doc in (out / "results.md", *([args.doc] if args.doc else [])):
        write_section(doc, section, command, text)
    json_records = json.dumps({"config": asdict(config), "runs": records}, indent=1, default=str)
    atomic_write_bytes(out / "results.json", json_records.encode())
    print(text)
    return 0


def main(argv=None) -> int:
    parser = build_parser("python -m benchmarks.ablation", __doc__, TABLE4 + EXTRA, "runs/ablation")
    return run_benchmark("benchmarks.ablation", argv, parser, SECTION, run_one, report)


if __name__ == "__main__":
    sys.exit(main())
