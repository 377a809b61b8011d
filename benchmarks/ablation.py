"""The paper's Table 4 (variants and ablations), Fig. 6 (interval) and Fig. 7 (hard vs soft)
on the built-in synthetic worlds, on the CPU:

    python -m benchmarks.ablation --out runs/ablation --doc docs/results.md
    python -m benchmarks.ablation --world depth thermal relative --out runs/ablation --doc docs/results.md

``--world`` chooses the worlds: by default ``depth`` and ``thermal``, the absolute family
(docs/datasets.md); ``relative`` is the relative family's world, whose aux reads only relative
to its scene, with larger scenes, a deeper backbone and a narrower GoPT of its own
(:data:`SETUPS`). For each world and seed a small ViT is first pretrained on RGB alone
by the demo's path (:func:`gopt_adapter.cli.demo.train_foundation`) with that seed: it is the
"pretrained foundation model" of that seed, shared by every row of the seed. Each variant
then starts from it and trains with the same seed, so the spread over seeds covers the
foundation's training as well as the adapter's (the world's scenes stay fixed); the table
reports mean and standard deviation over the seeds of the mIoU overall and on the classes
that only the auxiliary channel separates.

Runs go to two worker processes (one thread each, which beats one process with two threads
for a model this small). Every finished run leaves ``<out>/<world>/<variant>_s<seed>.json``,
every foundation ``<out>/<world>/foundation_vit_s<seed>.safetensors`` and beside it
``foundation_vit_s<seed>.json``; each record holds a fingerprint of its settings (the world's
setup, the row's schedule and options, the seed, the library version: :mod:`benchmarks.records`).
A job started again with the same ``--out`` reuses exactly the records whose fingerprint
matches and trains the rest (records from before fingerprints are trained again).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from gopt_adapter.baselines import VARIANTS, build_variant
from gopt_adapter.calibration import calibrate_missing_mode
from gopt_adapter.data import FAMILIES, world_family
from gopt_adapter.cli.demo import (
    DemoConfig,
    build_foundation_backbone,
    class_miou,
    synthetic_datasets,
    train_foundation,
)
from gopt_adapter.train.engine import Dist, TrainConfig, Trainer
from gopt_adapter.atomic_files import atomic_write_bytes
from gopt_adapter.parameters import count_parameters

from .markdown import invocation, mean_std, write_section
from .records import cached, fingerprint, write_json
from .workers import worker_pool
from .suite import TABLES

# Table 4 rows in the paper's order (GoPT with eq. 12 as printed beside ours), then the
# baseline it does not have, then the Fig. 6
# interval sweep on a 4-block backbone (gopt = interval 1, gopt_shallow = interval 4).
TABLE4 = ("foundation", "fft", "fft_early", "vpt_shallow", "vpt_deep", "gopt_shallow", "gopt", "gopt_rgb_query", "gopt_no_acp",
          "gopt_no_cup", "lora")
EXTRA = ("gopt_soft", "gopt_i2")
WORLDS = ("depth", "thermal")  # the default: the absolute family's worlds of the paper's pairings
CHOICES = WORLDS + FAMILIES["relative"]
PAPER_COLUMNS = {"depth": "nyudv2", "thermal": "mfnet", "relative": "nyudv2"}  # the paper's dataset of the same pairing
SECTION = "ablation"  # markers of the generated part of docs/results.md
LABELS = {"gopt_soft": "GoPT, soft assignment", "gopt_i2": "GoPT, interval 2"}  # rows not in the suite's Table 4
_FROZEN = TrainConfig(epochs=16, batch_size=16, lr=3e-3, weight_decay=0.01, warmup_steps=10, amp=False,
                      eval_every=0, log_every=24, progress=False)
_FULL = replace(_FROZEN, lr=5e-4)  # the rows that fine-tune the backbone


@dataclass(frozen=True)
class WorldSetup:
    """How the runs on one family of worlds are made.

    ``demo`` holds the scenes (size and counts), the backbone and the foundation's
    pretraining. Backbones that train (``foundation``, ``fft``, ``fft_early``) fine-tune a
    pretrained model on the ``full`` schedule, with a lower learning rate than the ``frozen``
    one of the frozen-backbone rows, whose prompters and head start from scratch; every row
    sees the same data, steps and schedule otherwise. ``gopt_hidden_dim`` is the width ``r``
    of every GoPT row (``None``: the library's default, 32).
    """

    demo: DemoConfig
    frozen: TrainConfig
    full: TrainConfig
    gopt_hidden_dim: int | None = None

    def __post_init__(self) -> None:
        if self.gopt_hidden_dim is not None and (not isinstance(self.gopt_hidden_dim, int) or self.gopt_hidden_dim < 1):
            raise ValueError(f"gopt_hidden_dim must be a positive integer or None, got {self.gopt_hidden_dim!r}")

    def regime(self, variant: str) -> TrainConfig:
        """The schedule of ``variant``'s rows: ``frozen`` or ``full``."""
        return self.frozen if VARIANTS[variant].frozen_backbone else self.full

    def train_config(self, variant: str, seed: int) -> TrainConfig:
        return replace(self.regime(variant), seed=seed)

    def variant_options(self, variant: str) -> dict[str, Any]:
        """The options ``variant`` is built with: GoPT's width for the GoPT rows."""
        return {"hidden_dim": self.gopt_hidden_dim} if self.gopt_hidden_dim and variant.startswith("gopt") else {}

    def overridden(self, epochs: int | None = None, train_length: int | None = None,
                   val_length: int | None = None) -> WorldSetup:
        """This setup with the command line's epochs (of every row) and scene counts; ``None`` keeps one."""
        lengths = {key: value for key, value in (("train_length", train_length), ("val_length", val_length))
                   if value is not None}
        setup = replace(self, demo=replace(self.demo, **lengths))
        if epochs is None:
            return setup
        return replace(setup, frozen=replace(self.frozen, epochs=epochs), full=replace(self.full, epochs=epochs))


#: The setup of each world family. Absolute: the demo's ViT (width 96, 4 blocks, patch 8) on 192
#: scenes of 64x64 (half the demo's 384, so that all three worlds' 117 runs fit an hour on 2
#: cores), whose foundation pretrains for 12 epochs (144 steps, as the demo's 6 epochs of 384).
#: Relative: 96 scenes of 128x128 (256 tokens of 8x8 pixels) and a ViT of width 64 with 8
#: blocks, whose foundation pretrains for 24 epochs (144 steps too); GoPT's width is 8 (ViPT's),
#: so that GoPT trains fewer parameters than VPT-Deep, as in the paper (tests/test_ablation.py
#: checks the order): at patch 8 and width 64 one of VPT-Deep's aux embeddings costs 4,160
#: parameters, a GoPT prompter of width 8 about 1,800 and one of width 32 about 12,800, whatever
#: the depth.
SETUPS: dict[str, WorldSetup] = {
    "absolute": WorldSetup(DemoConfig(train_length=192, val_length=128,
                                      foundation=replace(DemoConfig.foundation, epochs=12)), _FROZEN, _FULL),
    "relative": WorldSetup(
        DemoConfig(mode="relative", size=128, train_length=96, val_length=64,
                   backbone_kwargs=dict(embed_dim=64, depth=8, num_heads=2, patch_size=8, img_size=128,
                                        dynamic_img_size=True),
                   foundation=replace(DemoConfig.foundation, epochs=24)),
        _FROZEN, _FULL, gopt_hidden_dim=8),
}


@dataclass(frozen=True)
class AblationConfig:
    """What the ablation trains: worlds, seeds, variants, and the setup of each world family."""

    worlds: tuple[str, ...] = WORLDS
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = TABLE4 + EXTRA
    setups: dict[str, WorldSetup] = field(default_factory=lambda: dict(SETUPS))
    workers: int = 2

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
        bad_worlds = sorted(set(self.worlds) - set(CHOICES))
        if bad_worlds:
            raise ValueError(f"unknown worlds {bad_worlds}; valid: {list(CHOICES)}")
        unset = sorted({world_family(world) for world in self.worlds} - set(self.setups))
        if unset:
            raise ValueError(f"no setup for the world families {unset}")
        if not self.seeds or self.workers < 1:
            raise ValueError("need at least one seed and one worker")

    def setup(self, world: str) -> WorldSetup:
        """The setup of ``world``'s family."""
        return self.setups[world_family(world)]

    def foundation_settings(self, world: str) -> dict[str, Any]:
        """What the foundation of ``world`` depends on besides its seed: the world, its scenes,
        backbone and pretraining."""
        return {"world": world, "demo": asdict(self.setup(world).demo)}

    def run_settings(self, world: str, variant: str) -> dict[str, Any]:
        """What a run of ``variant`` on ``world`` depends on besides its seed: its foundation's
        settings, the row's schedule and its options."""
        setup = self.setup(world)
        return {**self.foundation_settings(world), "variant": variant, "train": asdict(setup.regime(variant)),
                "options": setup.variant_options(variant)}


# ------------------------------------------------------------------------ runs
def foundation_weights(out: Path, world: str, seed: int) -> Path:
    """Where the RGB-only foundation of ``world`` pretrained with ``seed`` is kept."""
    return out / world / f"foundation_vit_s{seed}.safetensors"


def foundation_record(weights: str | Path) -> Path:
    """The record beside a foundation's weights: its fingerprint, written once the weights are."""
    return Path(weights).with_suffix(".json")


def pretrain(config: AblationConfig, world: str, seed: int, weights: str) -> str:
    """Trains the RGB-only foundation of ``world`` with ``seed`` into ``weights`` (in a worker),
    then writes its record."""
    torch.set_num_threads(1)
    demo = replace(config.setup(world).demo, mode=world, out=str(Path(weights).with_suffix("")))
    train_foundation(demo, weights, progress=False, seed=seed)
    write_json(foundation_record(weights), {"world": world, "seed": seed,
                                            "fingerprint": fingerprint(config.foundation_settings(world), seed)})
    return weights


def train_run(config: AblationConfig, world: str, variant: str, seed: int, weights: str, work: Path):
    """Trains ``variant`` from the pretrained weights with ``seed`` (checkpoints under ``work``).

    An adapter with an aux-missing mode is then calibrated on the training set. Returns
    ``(model, final validation metrics, training set, validation set)``.
    """
    torch.set_num_threads(1)
    setup = config.setup(world)
    demo = replace(setup.demo, mode=world)
    train, val = synthetic_datasets(demo)
    num_classes = len(train.class_names)
    torch.manual_seed(seed)  # adapter / head initialisation
    model = build_variant(variant, build_foundation_backbone(demo, weights), train.aux_channels, num_classes,
                          **setup.variant_options(variant))
    metrics = Trainer(model, train, num_classes, setup.train_config(variant, seed), work, val_set=val,
                      device="cpu", ctx=Dist()).fit()
    if getattr(model.config, "has_missing_mode", False):  # as the demo and gopt train do
        calibrate_missing_mode(model, train)
    return model, metrics, train, val


def miou_record(metrics: dict[str, Any], dataset) -> dict[str, float | None]:
    """mIoU overall, on the classes only aux separates, and on the others (``None`` where there
    are none, as in the relative world: JSON has no NaN)."""
    aux_classes = sorted(dataset.aux_dependent_classes)
    rgb_classes = [c for c in range(len(dataset.class_names)) if c not in aux_classes]
    return {
        "miou": metrics["miou"],
        "miou_aux_classes": class_miou(metrics, aux_classes),
        "miou_rgb_classes": class_miou(metrics, rgb_classes) if rgb_classes else None,
    }


def finish_run(config: AblationConfig, result: str | Path, world: str, variant: str, seed: int, model, train,
               start: float, **fields: Any) -> dict[str, Any]:
    """Writes a run's record (atomically: its presence marks the run done), drops its
    checkpoint, and returns the record: the run's identity and fingerprint, its size,
    ``fields``, the world's RGB-only bound and the wall time since ``start``."""
    record = {
        "world": world, "variant": variant, "seed": seed,
        "fingerprint": fingerprint(config.run_settings(world, variant), seed),
        "trainable_parameters": count_parameters(model).trainable,
        **fields,
        "rgb_only_bound": train.rgb_only_miou_bound,
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(result, record)
    (Path(result).with_suffix("") / "checkpoint.pt").unlink(missing_ok=True)  # the record is what we keep
    return record


def run_one(config: AblationConfig, world: str, variant: str, seed: int, weights: str, result: str) -> dict[str, Any]:
    """Trains ``variant`` from the pretrained weights with ``seed``; writes and returns its record."""
    start = time.perf_counter()
    model, metrics, train, val = train_run(config, world, variant, seed, weights, Path(result).with_suffix(""))
    return finish_run(config, result, world, variant, seed, model, train, start, **miou_record(metrics, val),
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


def plan(config: AblationConfig, out: Path) -> tuple[list[dict[str, Any]], list[tuple], list[tuple]]:
    """What is left to do under ``out``: the records made with exactly these settings (reused),
    the runs ``(world, variant, seed, weights, result)`` to train, and the foundations
    ``(world, seed, weights)`` those runs need that are missing or were made otherwise."""
    records, todo, foundations = [], [], []
    for world in config.worlds:
        for seed in config.seeds:
            weights = foundation_weights(out, world, seed)
            runs = []
            for variant in config.variants:
                result = out / world / f"{variant}_s{seed}.json"
                record = cached(result, config.run_settings(world, variant), seed)
                if record is None:
                    runs.append((world, variant, seed, str(weights), str(result)))
                else:
                    records.append(record)
            if runs and not (weights.exists()  # a finished seed needs no foundation
                             and cached(foundation_record(weights), config.foundation_settings(world), seed)):
                foundations.append((world, seed, str(weights)))
            todo += runs
    return records, todo, foundations


def run_all(config: AblationConfig, out: Path, job: Callable[..., dict[str, Any]] = run_one,
            ) -> tuple[list[dict[str, Any]], int]:
    """Every (world, variant, seed) record, and how many came from an earlier invocation.

    ``job(config, world, variant, seed, weights, result)`` trains one run in a worker process and
    writes its record to ``result`` (a top-level function, so that it pickles).
    """
    records, todo, foundations = plan(config, out)
    # Longest first, so that no worker is left with a long run while the other idles: the rows
    # that fine-tune the backbone cost about 1.5x the frozen ones (a stable sort keeps the rest).
    todo.sort(key=lambda run: VARIANTS[run[1]].frozen_backbone)
    print(f"{len(records)} runs done before, {len(todo)} to go on {config.workers} workers", file=sys.stderr)
    start = time.perf_counter()
    with worker_pool(config.workers) as pool:
        for done in as_completed([pool.submit(pretrain, config, *args) for args in foundations]):
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
    """The paragraph that says how the runs of a synthetic-world benchmark were made: one
    sentence a world family, then what the cells hold."""
    bounds = {r["world"]: r["rgb_only_bound"] for r in records}
    families: dict[str, list[str]] = {}
    for world in config.worlds:
        families.setdefault(world_family(world), []).append(world)
    described = []
    for family, worlds in families.items():
        world_setup, demo = config.setups[family], config.setups[family].demo
        described.append(
            f"{' and '.join(worlds).capitalize()} world{'s' * (len(worlds) > 1)}: backbone `{demo.backbone}` with "
            f"{demo.backbone_kwargs}"
            + (f", GoPT rows of width {world_setup.gopt_hidden_dim}" if world_setup.gopt_hidden_dim else "")
            + f"; {demo.train_length} training and {demo.val_length} validation scenes at {demo.size}x{demo.size}; "
            f"the foundation pretrains for {demo.foundation.epochs} epochs; frozen-backbone rows: "
            f"{world_setup.frozen.epochs} epochs, batch {world_setup.frozen.batch_size}, AdamW, LR "
            f"{world_setup.frozen.lr:g}, polynomial decay; fine-tuned rows (Foundation, FFT, FFT-early): the same "
            f"with LR {world_setup.full.lr:g}.")
    return (
        f"Wall time of the command: {wall_s / 60:.1f} min on {config.workers} worker(s), 2 CPU cores"
        + (f" ({reused} runs found finished were not run again)." if reused else ".")
        + "\n\n"
        "Each world's foundation is pretrained on RGB alone by the demo's path once per seed, then each row of "
        "that seed trains from it, so the spread over seeds includes the foundation's training (the scenes are "
        "the same for every seed). " + " ".join(described)
        + f" Seeds {list(config.seeds)}; cells are mean ± standard deviation of mIoU in percent. "
        "\"aux\" is the mIoU over the classes that share their colour with another class and differ only "
        "in the auxiliary channel" + (" (in the relative world, every class)" if "relative" in families else "")
        + ". Best mIoU reachable from RGB alone, by construction: "
        + ", ".join(f"{w} {100 * bounds[w]:.1f}" for w in config.worlds if w in bounds) + "."
    )


def per_world(values: list[str]) -> str:
    """One value a world in the column order, or the value alone where every world has it."""
    return values[0] if len(set(values)) == 1 else " / ".join(values)


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

    papers = list(dict.fromkeys(PAPER_COLUMNS[w] for w in config.worlds))  # once, however many worlds pair with it
    lines = [
        setup(config, records, wall_s, reused),
        "",
        "### Table 4 layout: variants and ablations",
        "",
        f"| Method | Params ({' / '.join(config.worlds)}) | " + " | ".join(f"{w} mIoU | {w} aux" for w in config.worlds)
        + " | " + " | ".join(f"paper {dataset} mIoU" for dataset in papers) + " |",
        "|---|---:|" + "---:|---:|" * len(config.worlds) + "---:|" * len(papers),
    ]
    for variant in config.variants:
        if variant in EXTRA:
            continue
        ours = [c for w in config.worlds for c in cells(w, variant)]
        theirs = [paper.get(variant, {}).get(dataset) for dataset in papers]
        lines.append(f"| {labels.get(variant, variant)} | {params(variant)} | " + " | ".join(ours) + " | "
                     + " | ".join("-" if v is None else f"{v:.1f}" for v in theirs) + " |")
    backbones: dict[tuple[int, int], list[dict[str, Any]]] = {}  # (LayerNorms, channels) -> two-stream runs
    for record in records:
        if "exchanged_channels" in record:
            shape = record["exchanged_channels"]
            backbones.setdefault((shape["layer_norms"], shape["of"]), []).append(record)
    for (norms, channels), exchanged in backbones.items():
        counts = "; ".join(f"{r['world']} seed {r['seed']}: RGB {r['exchanged_channels']['rgb']}, aux "
                           f"{r['exchanged_channels']['aux']}" for r in exchanged)
        lines += ["", f"Two-stream FFT after training: channels each stream takes from the other, summed over its "
                  f"{norms} LayerNorms of {channels:,} channels per stream ({counts})."]
    blocks = per_world([str(config.setup(w).demo.backbone_kwargs["depth"]) for w in config.worlds])
    intervals = {"gopt": "1", "gopt_i2": "2", "gopt_shallow": blocks}  # GoPT-Shallow: one prompter for all blocks
    lines += ["", f"### Fig. 6 layout: interval between prompters ({blocks}-block backbone)", "",
              f"| interval | Params ({' / '.join(config.worlds)}) | " + " | ".join(f"{w} mIoU | {w} aux" for w in config.worlds) + " |",
              "|---:|---:|" + "---:|---:|" * len(config.worlds)]
    for variant, interval in intervals.items():
        if variant in config.variants:
            lines.append(f"| {interval} | {params(variant)} | "
                         + " | ".join(c for w in config.worlds for c in cells(w, variant)) + " |")
    lines += ["", "### Fig. 7 layout: hard vs soft assignment", "",
              "| assignment | " + " | ".join(f"{w} mIoU | {w} aux" for w in config.worlds) + " |",
              "|---|" + "---:|---:|" * len(config.worlds)]
    for variant, name in (("gopt", "hard (Gumbel, straight-through)"), ("gopt_soft", "soft")):
        if variant in config.variants:
            lines.append(f"| {name} | " + " | ".join(c for w in config.worlds for c in cells(w, variant)) + " |")
    return "\n".join(lines) + "\n"


def build_parser(prog: str, description: str, variants: tuple[str, ...], out: str,
                 setups: dict[str, WorldSetup] = SETUPS) -> argparse.ArgumentParser:
    """The options of the synthetic-world benchmarks (this one and benchmarks.robustness, each
    with its families' ``setups``, which the parsed arguments carry to :func:`config_from_args`)."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(setups=setups)
    parser.add_argument("--out", default=out, help="folder for the runs (resumable)")
    parser.add_argument("--doc", help="write the Markdown report here (e.g. docs/results.md)")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(AblationConfig.seeds))
    parser.add_argument("--world", "--worlds", dest="worlds", nargs="+", default=list(WORLDS), metavar="WORLD",
                        help=f"worlds of {list(CHOICES)} (default: {' '.join(WORLDS)}, the absolute family); "
                             "relative: the relative family's world, on its own setup")
    parser.add_argument("--variants", nargs="+", default=list(variants), help="subset of the rows")

    def defaults(read: Callable[[WorldSetup], int]) -> str:
        return ", ".join(f"{read(world_setup)} {family}" for family, world_setup in setups.items())

    parser.add_argument("--epochs", type=int,
                        help=f"epochs of every row (default: each family's own, {defaults(lambda w: w.frozen.epochs)})")
    parser.add_argument("--train-length", type=int,
                        help=f"training scenes (default: {defaults(lambda w: w.demo.train_length)})")
    parser.add_argument("--val-length", type=int,
                        help=f"validation scenes (default: {defaults(lambda w: w.demo.val_length)})")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes of one thread each (1: in this process)")
    return parser


def config_from_args(args: argparse.Namespace) -> AblationConfig:
    """The config of the command line: every family's setup (``args.setups``) with its overrides."""
    return AblationConfig(
        worlds=tuple(args.worlds), seeds=tuple(args.seeds), variants=tuple(args.variants),
        setups={family: world_setup.overridden(args.epochs, args.train_length, args.val_length)
                for family, world_setup in args.setups.items()},
        workers=args.workers,
    )


def run_benchmark(module: str, argv, parser: argparse.ArgumentParser, section: str,
                  job: Callable[..., dict[str, Any]], report_fn: Callable[..., str]) -> int:
    """Parses ``argv`` with ``parser`` (from :func:`build_parser`), runs every missing run with
    ``job``, and writes the report into ``<out>/results.md``, the ``--doc`` file (between the
    ``section`` markers) and ``<out>/results.json``."""
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
