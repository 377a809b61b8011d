"""Serving many tasks from one resident backbone: mixed-task batches against per-task batches.

    python -m benchmarks.serve --doc docs/performance.md     # ViT-S and ViT-B, 224 and 480x640
    python -m benchmarks.serve --quick                        # a tiny ViT at 64x64, seconds

For each backbone and image size, one segmenter holds ``max(--tasks)`` GoPT adapters
(40 classes, a prompter before every block). For each batch size ``B`` and task count ``T``
(samples dealt to the tasks in turn; a batch of 8 over 16 tasks holds 8 of them):

- **mixed**: one :meth:`~gopt_adapter.GoptSegmenter.forward_mixed` over the ``B`` samples;
- **per task**: what a server without mixed batches does, ``set_adapter`` and one forward
  per task present, over that task's samples.

Both run in every round, which of them goes first alternating, after a warm-up forward;
each figure is the median of the rounds, and the ratio is taken inside the run. With one
task the two compute the same thing, so that row shows the noise of the measurement. Also: the latency of one request
(batch 1, ``forward_mixed`` with one name; p50/p95 over ``--requests``), the memory each
extra resident task adds (bytes of its adapter's tensors: the backbone is shared), and the
``set_adapter`` / ``load_adapter`` times (``benchmarks.perf.measure_swaps``). CPU fp32,
inference mode.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

from gopt_adapter import GoptConfig, apply_gopt
from gopt_adapter.cli.bench import timed_call

from .markdown import invocation, write_section
from .perf import Row, measure_swaps

MODELS = ("vit_small_patch16_224", "vit_base_patch16_224")
#: Sizes with at least this many pixels use ``--large-repeats`` rounds (ViT-B at 480x640 and
#: batch 32 takes about half a minute per forward on two cores).
LARGE_PIXELS = 300_000
CPU = torch.device("cpu")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--sizes", nargs="+", default=["224x224", "480x640"], metavar="HxW")
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--tasks", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of mixed vs per-task at small sizes")
    parser.add_argument("--large-repeats", type=int, default=1,
                        help=f"rounds at sizes of {LARGE_PIXELS:,} pixels or more")
    parser.add_argument("--requests", type=int, default=20, help="single requests timed for the latency")
    parser.add_argument("--swap-repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 is steadier on a busy machine")
    parser.add_argument("--quick", action="store_true", help="a 2-block ViT at 64x64: checks the code path")
    parser.add_argument("--doc", help="also write the tables into this Markdown file (e.g. docs/performance.md)")
    args = parser.parse_args(argv)
    try:
        args.sizes = [tuple(int(v) for v in size.lower().split("x")) for size in args.sizes]
    except ValueError:
        parser.error(f"--sizes takes HxW values such as 480x640, got {args.sizes}")
    if args.quick:
        args.models, args.sizes, args.batches, args.tasks = ["quick"], [(64, 64)], [4], [1, 2]
        args.repeats, args.requests, args.swap_repeats = 1, 3, 3
    return args


def build(name: str, tasks: int, num_classes: int):
    """One backbone with ``tasks`` adapters: ``default`` (the first) and ``task1``..."""
    torch.manual_seed(0)
    if name == "quick":
        vit = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True,
                                embed_dim=32, depth=2, num_heads=2, img_size=64)
    else:
        vit = timm.create_model(name, pretrained=False, num_classes=0, dynamic_img_size=True)
    segmenter = apply_gopt(vit, aux_channels=1, num_classes=num_classes)
    for index in range(1, tasks):
        segmenter.add_adapter(f"task{index}", GoptConfig(aux_channels=1, num_classes=num_classes))
    return segmenter.eval()


def timed(fn) -> float:
    return timed_call(fn, CPU)  # one timed call


def per_task(segmenter, rgb, aux, names) -> None:
    """The server without mixed batches: one forward per task, over that task's samples."""
    for name in dict.fromkeys(names):
        samples = [i for i, n in enumerate(names) if n == name]
        segmenter.set_adapter(name)
        segmenter(rgb[samples], aux[samples])


def resident_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def task_names(args) -> list[str]:
    return ["default"] + [f"task{i}" for i in range(1, max(args.tasks))]


def measure_batch(args, segmenter, size: tuple[int, int], batch: int) -> list[tuple]:
    """``(batch, tasks, tasks present, mixed s, per-task s)`` for each task count."""
    tasks = task_names(args)
    repeats = args.large_repeats if size[0] * size[1] >= LARGE_PIXELS else args.repeats
    generator = torch.Generator().manual_seed(batch)
    rgb, aux = torch.randn(batch, 3, *size, generator=generator), torch.randn(batch, 1, *size, generator=generator)
    rows = []
    with torch.inference_mode():
        segmenter.forward_mixed(rgb[:1], aux[:1], ["default"])  # warm-up of both paths
        segmenter(rgb[:1], aux[:1])
        for count in args.tasks:
            names = [tasks[i % count] for i in range(batch)]
            mixed, sequential = [], []
            for round_ in range(repeats):  # which goes first alternates: no order bias
                for kind in ("mixed", "per task") if round_ % 2 == 0 else ("per task", "mixed"):
                    if kind == "mixed":
                        mixed.append(timed(lambda: segmenter.forward_mixed(rgb, aux, names)))
                    else:
                        sequential.append(timed(lambda: per_task(segmenter, rgb, aux, names)))
            segmenter.set_adapter("default")
            rows.append((batch, count, len(set(names)), statistics.median(mixed), statistics.median(sequential)))
    return rows


def measure_serving(args, segmenter, size: tuple[int, int]) -> dict[str, float]:
    """Single-request latency, memory per resident task, swap times."""
    tasks = task_names(args)
    generator = torch.Generator().manual_seed(1)
    rgb, aux = torch.randn(1, 3, *size, generator=generator), torch.randn(1, 1, *size, generator=generator)
    latency = []
    with torch.inference_mode():
        segmenter.forward_mixed(rgb, aux, ["default"])  # warm-up
        for index in range(args.requests):
            name = tasks[index % len(tasks)]
            latency.append(timed(lambda: segmenter.forward_mixed(rgb, aux, [name])))
    swaps = measure_swaps([Row("gopt", segmenter, 0, 0, [], [])], args.swap_repeats, rgb, aux)
    p50, p95 = torch.tensor(latency).quantile(torch.tensor([0.5, 0.95])).tolist()
    return {"p50_ms": 1e3 * p50, "p95_ms": 1e3 * p95, "task_mb": resident_bytes(segmenter.adapter) / 1e6,
            "backbone_mb": resident_bytes(segmenter.backbone) / 1e6, **swaps}


def label(model: str) -> str:
    return "2-block ViT (embed 32)" if model == "quick" else f"`{model}`"


def report(args, batches: dict, serving: dict, done: int, total: int, seconds: float) -> str:
    """Both tables as Markdown, with what was measured of what was asked."""
    lines = [
        f"CPU fp32, {torch.get_num_threads()} thread(s), {platform.processor() or platform.machine()}, torch "
        f"{torch.__version__}, measured {time.strftime('%Y-%m-%d')}; {max(args.tasks)} resident tasks per backbone "
        f"({args.num_classes} classes, a prompter before every block); median of {args.repeats} round(s) "
        f"({args.large_repeats} at {LARGE_PIXELS:,} pixels or more), mixed and per-task alternating. "
        f"{done} of {total} measurements done in {seconds:.0f} s.",
        "",
        "| backbone | size | batch | tasks (in the batch) | mixed batch | per-task batches | mixed / per-task |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (model, size), rows in batches.items():
        for batch, count, present, mixed, sequential in sorted(rows):
            tasks_cell = f"{count}" if present == count else f"{count} ({present})"
            lines.append(f"| {label(model)} | {size[0]}x{size[1]} | {batch} | {tasks_cell} | {mixed:.3f} s | "
                         f"{sequential:.3f} s | {mixed / sequential:.2f} |")
    lines += [
        "",
        f"| backbone | size | one request p50 | p95 (of {args.requests}) | each extra task | shared backbone | "
        f"`set_adapter` | `load_adapter` |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, size), row in serving.items():
        lines.append(f"| {label(model)} | {size[0]}x{size[1]} | {row['p50_ms']:.1f} ms | {row['p95_ms']:.1f} ms | "
                     f"{row['task_mb']:.2f} MB | {row['backbone_mb']:.1f} MB | {row['set_adapter_ms']:.3f} ms | "
                     f"{row['load_adapter_ms']:.2f} ms |")
    lines += ["", f"Swap times: median of {args.swap_repeats}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> str:
    """Measures the first batch size (and latency, memory, swaps) for every backbone and size,
    cheapest first, then the other batch sizes. With ``--doc`` the section is rewritten after
    each step, so a run stopped early still leaves what it measured, and says how much."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = sorted(((m, s) for m in args.models for s in args.sizes),
                     key=lambda c: (c[1][0] * c[1][1], args.models.index(c[0])))
    steps = [(batch, model, size) for batch in args.batches for model, size in configs]
    started = time.perf_counter()
    batches: dict = {config: [] for config in configs}
    serving: dict = {}
    text = ""
    for done, (batch, model, size) in enumerate(steps, start=1):
        segmenter = build(model, max(args.tasks), args.num_classes)  # seeded: the same model every step
        batches[(model, size)] += measure_batch(args, segmenter, size, batch)
        if (model, size) not in serving:
            serving[(model, size)] = measure_serving(args, segmenter, size)
        text = report(args, {c: r for c, r in batches.items() if r}, serving, done, len(steps),
                      time.perf_counter() - started)
        print(f"[{done}/{len(steps)}] {model} {size[0]}x{size[1]} batch {batch}", flush=True)
        if args.doc:
            write_section(args.doc, "serve", invocation("benchmarks.serve", argv), text)
    print(text)
    return text


if __name__ == "__main__":
    main()
