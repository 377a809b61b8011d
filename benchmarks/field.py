"""The paper's comparison on real frames: 200 MFNet RGB-thermal frames and a real, frozen,
RGB-pretrained ViT-S/14 (``../shared/field``), on the CPU:

    python -m benchmarks.field --out runs/field --doc docs/results.md
    python -m benchmarks.field --quick --out runs/field_quick     # CI: 32 frames, tiny scale, 1 seed

Every row trains with one recipe (:class:`FieldRecipe`: image scale, epochs, batch, schedule,
augmentation), through the same path as ``gopt train``: a settings file, the real MFNet reader,
``gopt_adapter.train.run.run``. Only the learning rate differs between rows, and each row picks
its own from the same grid, by validation mIoU of the first seed (the only split there is
besides training: the frames that judge the results in the end are held out from us). The
other seeds then train at that rate. With ``--write-configs`` the chosen settings are written
to ``benchmarks/configs/field_<variant>.json``, so that

    gopt train --config benchmarks/configs/field_gopt.json --variant gopt --dataset mfnet \\
        --root ../shared/field/mfnet_subset --weights <the ViT-S/14 file> --set train.seed=1

reproduces a row on any copy of MFNet.

Each finished run leaves ``<out>/runs/<variant>_lr<lr>_s<seed>.json`` with a fingerprint of
its settings (the recipe, the row, the library version); a run started again with the same
``--out`` reuses exactly the records whose fingerprint matches and trains the rest. Runs go to
``--workers`` processes of one thread each (one: this process). A run whose weights are not
finite, or whose model predicts one class only on the validation frames, fails the benchmark
(exit status 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import Future, wait, FIRST_COMPLETED
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from gopt_adapter.baselines import VARIANTS
from gopt_adapter.atomic_files import atomic_write_bytes
from gopt_adapter.train.losses import LOSSES

from .markdown import invocation, mean_std, write_section
from .records import cached, fingerprint, write_json
from .workers import worker_pool

FIELD = Path(__file__).resolve().parents[2] / "shared" / "field"
ROOT = FIELD / "mfnet_subset"
WEIGHTS = FIELD / "weights" / "vit_small_patch14_dinov2.imgfocus.fp16.safetensors"
BACKBONE = "vit_small_patch14_dinov2"
CONFIGS = Path(__file__).resolve().parent / "configs"
SECTION = "field"

#: Rows in the order of the paper's Table 4, the RGB-only floor first.
ROWS = ("probe", "vpt_shallow", "vpt_deep", "lora", "gopt_shallow", "gopt", "gopt_no_acp", "gopt_no_cup")
LABELS = {
    "probe": "Probe: frozen ViT + head, RGB only",
    "vpt_shallow": "VPT-Shallow",
    "vpt_deep": "VPT-Deep",
    "lora": "LoRA (r 8) + aux tokens",
    "gopt_shallow": "GoPT-Shallow",
    "gopt": "GoPT",
    "gopt_no_acp": "GoPT (w/o ACP)",
    "gopt_no_cup": "GoPT (w/o CUP)",
}
SHOWN_CLASSES = ("person", "car", "bike")


@dataclass(frozen=True)
class FieldRecipe:
    """The recipe every row shares; each row chooses only its LR, from ``lr_grid``.

    ``image_scale`` resizes every frame first (0.5: 240x320, 18x23 patches of 14 pixels, the
    last row and column padded), and metrics are computed on the full 480x640 labels. Training
    takes a random rescale in ``scale_range``, a ``crop_size`` crop of that (12x16 patches: the
    CPU's budget) and a flip. ``loss`` is ``train.loss`` (``"ce"``, the paper's, unless a smoke
    test needs otherwise: :data:`QUICK`).
    """

    image_scale: float = 0.5
    crop_size: tuple[int, int] = (168, 224)
    epochs: int = 8
    batch_size: int = 8
    weight_decay: float = 0.01
    warmup_steps: int = 12
    scale_range: tuple[float, float] = (0.75, 1.25)
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    loss: str = "ce"
    seeds: tuple[int, ...] = (0, 1, 2)
    variants: tuple[str, ...] = ROWS
    workers: int = 2
    frames: tuple[int, int] | None = None  # (train, val) frames of a smaller copy, half day, half night; None: all

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(VARIANTS))
        if unknown:
            raise ValueError(f"unknown variants {unknown}; valid: {sorted(VARIANTS)}")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not (self.seeds and self.lr_grid and self.workers >= 1):
            raise ValueError("need at least one seed, one learning rate and one worker")
        if self.frames is not None and not all(isinstance(n, int) and n >= 2 and n % 2 == 0 for n in self.frames):
            raise ValueError(f"frames must be two even counts >= 2 (train, val), got {self.frames}")

    def identity(self, variant: str, lr: float) -> dict[str, Any]:
        """What a record's fingerprint is made of: the row's settings, and the frames when a
        smaller copy of the data is used."""
        settings = self.settings(variant, lr)
        return settings if self.frames is None else {**settings, "frames": list(self.frames)}

    def settings(self, variant: str, lr: float) -> dict[str, Any]:
        """The ``gopt train`` settings file of ``variant`` at ``lr`` (seed, data and weights come
        from the command line)."""
        train = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": lr, "weight_decay": self.weight_decay,
                 "warmup_steps": self.warmup_steps, "poly_power": 1.0, "eval_every": 0, "log_every": 4}
        if self.loss != "ce":  # the default stays out of the file (and of the records' fingerprints)
            train["loss"] = self.loss
        return {
            "variant": variant,
            "backbone": BACKBONE,
            "val_split": "val",
            "transforms": {"image_scale": self.image_scale, "crop_size": list(self.crop_size),
                           "scale_range": list(self.scale_range), "augment": True},
            "train": train,
        }


#: ``--quick``: 24 training and 8 validation frames (half day, half night) at 0.15 (72x96, 6x7
#: patches), 2 epochs (12 steps), one LR and one seed (CI). Class-weighted cross-entropy: at this
#: size plain cross-entropy left LoRA and GoPT predicting "unlabeled" (93.5% of the pixels)
#: everywhere even after 2 epochs on all 100 frames, and a smoke test must not hinge on that.
QUICK = FieldRecipe(image_scale=0.15, crop_size=(72, 96), epochs=2, batch_size=4, warmup_steps=0, lr_grid=(1e-2,),
                    loss="ce_weighted", seeds=(0,), frames=(24, 8))


def subset_root(root: str | Path, folder: Path, frames: tuple[int, int]) -> Path:
    """A copy of the MFNet folder at ``root`` made of links, in ``folder``: its ``images`` and
    ``labels``, with ``train.txt`` / ``val.txt`` listing ``frames`` (train, val) stems, half
    day and half night, spread evenly over each list."""
    root = Path(root).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("images", "labels"):
        link = folder / name
        if not link.exists():
            link.symlink_to(root / name, target_is_directory=True)
    for split, count in zip(("train", "val"), frames):
        stems = (root / f"{split}.txt").read_text().split()
        chosen = []
        for time_of_day in ("D", "N"):
            pool = [stem for stem in stems if stem.endswith(time_of_day)]
            if len(pool) < count // 2:
                raise ValueError(f"{root / f'{split}.txt'} lists {len(pool)} {time_of_day} frames, fewer than "
                                 f"{count // 2}")
            chosen += [pool[i * len(pool) // (count // 2)] for i in range(count // 2)]
        (folder / f"{split}.txt").write_text("\n".join(chosen) + "\n")
    return folder


def record_path(out: Path, variant: str, lr: float, seed: int) -> Path:
    return out / "runs" / f"{variant}_lr{lr:g}_s{seed}.json"


# ------------------------------------------------------------------------ runs
def run_one(settings: dict[str, Any], seed: int, root: str, weights: str, work: str, result: str,
            identity: dict[str, Any] | None = None) -> dict[str, Any]:
    """Trains one row with one seed through ``gopt train``'s own path; writes its record,
    fingerprinted by ``identity`` (default: the settings)."""
    import torch

    from gopt_adapter.cli.commands import build_train_parser
    from gopt_adapter.train.run import run
    from gopt_adapter.train.run_config import load_run_config

    torch.set_num_threads(1)
    work_dir = Path(work)
    work_dir.mkdir(parents=True, exist_ok=True)
    settings_file = work_dir / "settings.json"
    write_json(settings_file, settings)
    args = build_train_parser().parse_args([
        "--dataset", "mfnet", "--config", str(settings_file), "--variant", settings["variant"], "--root", root,
        "--weights", weights, "--out", str(work_dir), "--set", f"train.seed={seed}", "--no-progress"])
    start = time.perf_counter()
    results = run(load_run_config(args), device="cpu")
    metrics, names = results["metrics"], results["class_names"]
    record = {
        "variant": settings["variant"], "lr": settings["train"]["lr"], "seed": seed,
        "fingerprint": fingerprint(settings if identity is None else identity, seed),
        "miou": metrics["miou"],
        "day": metrics["subsets"]["day"]["miou"], "night": metrics["subsets"]["night"]["miou"],
        "iou": {name: metrics["iou"][names.index(name)] for name in SHOWN_CLASSES},
        "predicted_classes": metrics["predicted_classes"],
        "nonfinite_steps": results["nonfinite_steps"],
        "trainable_parameters": results["trainable_parameters"],
        "train_time_s": results["wall_time_s"],
        "wall_time_s": time.perf_counter() - start,
    }
    write_json(result, record)
    (work_dir / "checkpoint.pt").unlink(missing_ok=True)  # the record is what we keep
    return record


def choose_lr(records: list[dict[str, Any]]) -> float:
    """The grid's LR with the best validation mIoU of the first seed (ties: the smaller LR)."""
    return max(records, key=lambda r: (r["miou"], -r["lr"]))["lr"]


def run_all(recipe: FieldRecipe, out: Path, root: str, weights: str) -> tuple[list[dict], dict[str, float], int]:
    """Every row's grid (first seed), then its other seeds at the chosen LR. Returns the
    records, the chosen LR per row, and how many records were reused."""
    first, others = recipe.seeds[0], recipe.seeds[1:]
    if recipe.frames is not None:
        root = str(subset_root(root, out / "data", recipe.frames))
    records: list[dict[str, Any]] = []
    grid: dict[str, list[dict[str, Any]]] = {v: [] for v in recipe.variants}
    chosen: dict[str, float] = {}
    reused = 0
    start = time.perf_counter()
    with worker_pool(recipe.workers) as pool:
        pending: dict[Future, tuple[str, bool]] = {}

        def submit(variant: str, lr: float, seed: int, in_grid: bool) -> None:
            nonlocal reused
            settings, identity = recipe.settings(variant, lr), recipe.identity(variant, lr)
            path = record_path(out, variant, lr, seed)
            record = cached(path, identity, seed)
            if record is not None:
                reused += 1
                collect(record, in_grid)
                return
            work = out / "work" / path.stem
            pending[pool.submit(run_one, settings, seed, root, weights, str(work), str(path), identity)] = \
                (variant, in_grid)

        def collect(record: dict[str, Any], in_grid: bool) -> None:
            records.append(record)
            variant = record["variant"]
            if in_grid:
                grid[variant].append(record)
                if len(grid[variant]) == len(recipe.lr_grid):
                    chosen[variant] = choose_lr(grid[variant])
                    for seed in others:
                        submit(variant, chosen[variant], seed, False)

        for variant in recipe.variants:
            for lr in recipe.lr_grid:
                submit(variant, lr, first, True)
        done_count = 0
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                variant, in_grid = pending.pop(future)
                record = future.result()
                done_count += 1
                elapsed = time.perf_counter() - start
                print(f"[{done_count}] {variant:13s} lr {record['lr']:g} seed {record['seed']}: mIoU "
                      f"{100 * record['miou']:.1f} (day {100 * record['day']:.1f}, night {100 * record['night']:.1f}), "
                      f"person {100 * record['iou']['person']:.1f}, {record['wall_time_s']:.0f} s; "
                      f"{elapsed / 60:.1f} min elapsed", file=sys.stderr, flush=True)
                collect(record, in_grid)
    return records, chosen, reused


def problems(records: list[dict[str, Any]]) -> list[str]:
    """What makes a run a failure although it ended: skipped non-finite steps, one class."""
    found = []
    for r in records:
        name = f"{r['variant']} lr {r['lr']:g} seed {r['seed']}"
        if r["nonfinite_steps"]:
            found.append(f"{name}: {r['nonfinite_steps']} training steps had non-finite values")
        if r["predicted_classes"] < 2:
            found.append(f"{name}: predicts a single class on the validation frames")
    return found


# ---------------------------------------------------------------------- report
def report(recipe: FieldRecipe, records: list[dict[str, Any]], chosen: dict[str, float], wall_s: float,
           reused: int) -> str:
    """Markdown: how the rows were trained, then one line per row, mean ± std over the seeds."""
    final = {v: [r for r in records if r["variant"] == v and r["lr"] == chosen.get(v)] for v in recipe.variants}
    grid = {v: {r["lr"]: r["miou"] for r in records if r["variant"] == v and r["seed"] == recipe.seeds[0]}
            for v in recipe.variants}
    height, width = recipe.crop_size
    train_frames, val_frames = recipe.frames or (100, 100)
    data = (f"{'the' if recipe.frames is None else 'a copy with'} {train_frames} `train` frames of "
            f"`../shared/field/mfnet_subset` for training, {val_frames} `val` frames ({val_frames // 2} day, "
            f"{val_frames // 2} night) for every figure")
    lines = [
        f"Wall time of the command: {wall_s / 60:.1f} min on {recipe.workers} worker(s) of one thread, 2 CPU cores"
        + (f" ({reused} runs found finished were not run again)." if reused else "."),
        "",
        f"Backbone: `{BACKBONE}` with the real RGB-pretrained weights of `../shared/field/weights`, frozen in "
        f"every row. Data: {data}; 9 classes, \"unlabeled\" counted as in MFNet's own "
        f"protocol. Every row: frames scaled by {recipe.image_scale:g} ({round(480 * recipe.image_scale)}x"
        f"{round(640 * recipe.image_scale)}), random rescale {recipe.scale_range[0]:g}-{recipe.scale_range[1]:g}, "
        f"random {height}x{width} crops, flips, "
        f"{recipe.epochs} epochs at batch {recipe.batch_size}, AdamW (weight decay {recipe.weight_decay:g}), "
        f"{recipe.warmup_steps} warm-up steps then linear decay; metrics on the full 480x640 labels. The LR of "
        f"each row is the best of {', '.join(f'{lr:g}' for lr in recipe.lr_grid)} by validation mIoU of seed "
        f"{recipe.seeds[0]}; seeds {list(recipe.seeds)}. Cells: mean ± standard deviation over the seeds, IoU in %.",
        "",
        "| row | mIoU | day | night | person | car | bike | trainable params | train time (s) | LR (grid mIoU) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for variant in recipe.variants:
        runs = final[variant]
        if not runs:
            continue
        tried = ", ".join(f"{'**' if lr == chosen[variant] else ''}{lr:g}: {100 * miou:.1f}"
                          f"{'**' if lr == chosen[variant] else ''}" for lr, miou in sorted(grid[variant].items()))
        seconds = statistics.median(r["train_time_s"] for r in runs)
        lines.append(
            f"| {LABELS.get(variant, variant)} | {mean_std([r['miou'] for r in runs])} | "
            f"{mean_std([r['day'] for r in runs])} | {mean_std([r['night'] for r in runs])} | "
            + " | ".join(mean_std([r["iou"][name] for r in runs]) for name in SHOWN_CLASSES)
            + f" | {runs[0]['trainable_parameters']:,} | {seconds:.0f} | {tried} |"
        )
    return "\n".join(lines) + "\n"


def write_configs(recipe: FieldRecipe, chosen: dict[str, float], folder: Path = CONFIGS) -> list[Path]:
    """``field_<variant>.json`` for every row with its chosen LR: ``gopt train --config`` files."""
    written = []
    folder.mkdir(parents=True, exist_ok=True)
    for variant, lr in chosen.items():
        path = folder / f"field_{variant}.json"
        write_json(path, recipe.settings(variant, lr))
        written.append(path)
    return written


# ------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.field", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/field", help="folder for the runs (resumable)")
    parser.add_argument("--doc", help="write the Markdown report here (e.g. docs/results.md)")
    parser.add_argument("--root", default=str(ROOT), help="the MFNet folder (default: ../shared/field/mfnet_subset)")
    parser.add_argument("--weights", default=str(WEIGHTS), help="the ViT-S/14 weights file")
    parser.add_argument("--quick", action="store_true",
                        help="32 frames at a tiny scale, one seed, one LR: checks that every row trains (CI)")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2 (--quick: 0)")
    parser.add_argument("--variants", nargs="+", help=f"subset of the rows (default: {' '.join(ROWS)})")
    parser.add_argument("--workers", type=int, default=2, help="parallel processes of one thread each (1: in this process)")
    parser.add_argument("--write-configs", action="store_true",
                        help="write the chosen settings to benchmarks/configs/field_<variant>.json")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    recipe = QUICK if args.quick else FieldRecipe()
    try:
        recipe = replace(recipe, workers=args.workers,
                         **({"seeds": tuple(args.seeds)} if args.seeds else {}),
                         **({"variants": tuple(args.variants)} if args.variants else {}))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for path, what in ((Path(args.root), "MFNet folder"), (Path(args.weights), "weights file")):
        if not path.exists():
            print(f"error: {what} {path} not found (the field data lives in ../shared/field)", file=sys.stderr)
            return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    records, chosen, reused = run_all(recipe, out, args.root, args.weights)
    text = report(recipe, records, chosen, time.perf_counter() - start, reused)
    command = invocation("benchmarks.field", argv)
    for doc in (out / "results.md", *([args.doc] if args.doc else [])):
        write_section(doc, SECTION, command, text)
    atomic_write_bytes(out / "results.json", json.dumps({"recipe": asdict(recipe), "chosen_lr": chosen,
                                                         "runs": records}, indent=1).encode())
    if args.write_configs:
        for path in write_configs(recipe, chosen):
            print(f"wrote {path}", file=sys.stderr)
    print(text)
    failures = problems(records)
    for line in failures:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
