"""Parameters and compute of the Table 4 variants beside Foundation (docs/benchmarks.md, "Cost"):

    python -m benchmarks.variant_cost --doc docs/benchmarks.md

1. Parameters (trainable, total) and forward GFLOPs per image of each variant on ``--model``
   (default ViT-B/16) at ``--size`` (default NYUDv2's 480x640), ``--classes`` classes and one aux
   channel, built on the meta device (shapes only: no weights, no arithmetic). FLOPs are
   ``torch.utils.flop_counter``'s: matrix products, convolutions and attention; norms and
   element-wise operations are not counted.
2. Measured forward time (eval, no gradients) of each variant over Foundation's on this CPU, on
   a small random ViT (``--time-model`` at ``--time-size``, batch 2): variants interleaved,
   ``--repeats`` rounds, median per variant.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from gopt_adapter.baselines import VARIANTS as REGISTRY
from gopt_adapter.baselines import build_variant
from gopt_adapter.parameters import count_parameters

from .markdown import invocation, write_section

VARIANTS = ("foundation", "fft", "fft_early", "vpt_shallow", "vpt_deep", "gopt_shallow", "gopt")
SECTION = "variant-cost"


def _size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    return int(height), int(width)


def build(name: str, model_name: str, classes: int) -> torch.nn.Module:
    model = timm.create_model(model_name, pretrained=False, num_classes=0, dynamic_img_size=True)
    return build_variant(name, model, 1, classes).eval()


def gflops(model: torch.nn.Module, size: tuple[int, int]) -> float:
    """Forward GFLOPs of one image (``model`` on the meta device)."""
    model.requires_grad_(False)  # the flop counter's module tracker needs no autograd graph
    rgb, aux = torch.empty(1, 3, *size, device="meta"), torch.empty(1, 1, *size, device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(rgb, aux)
    return counter.get_total_flops() / 1e9


def forward_times(variants: tuple[str, ...], model_name: str, size: tuple[int, int], classes: int,
                  repeats: int) -> dict[str, float]:
    """Median seconds of one forward per variant, interleaved rounds (same weights, same batch)."""
    torch.manual_seed(0)
    models = {name: build(name, model_name, classes) for name in variants}
    generator = torch.Generator().manual_seed(0)
    rgb, aux = torch.randn(2, 3, *size, generator=generator), torch.randn(2, 1, *size, generator=generator)
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.inference_mode():
        for model in models.values():
            model(rgb, aux)  # warm-up
        for _ in range(repeats):
            for name, model in models.items():
                start = time.perf_counter()
                model(rgb, aux)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(args: argparse.Namespace) -> str:
    variants = tuple(dict.fromkeys(("foundation", *args.variants)))
    rows = {}
    for name in variants:
        with torch.device("meta"):
            model = build(name, args.model, args.classes)
        rows[name] = (count_parameters(model), gflops(model, args.size))
    seconds = forward_times(variants, args.time_model, args.time_size, args.classes, args.repeats)
    base_flops, base_time = rows["foundation"][1], seconds["foundation"]
    height, width = args.size
    threads = torch.get_num_threads()
    lines = [
        f"`{args.model}` at {height}x{width}, {args.classes} classes, one aux channel; GFLOPs per image (matrix "
        f"products, convolutions, attention). Forward time: `{args.time_model}` (random weights) at "
        f"{args.time_size[0]}x{args.time_size[1]}, batch 2, eval, median of {args.repeats} interleaved rounds on "
        f"{platform.machine()} CPU ({threads} thread{'s' * (threads != 1)}), over Foundation's.",
        "",
        "| variant | paper row | trainable | total | GFLOPs | GFLOPs / Foundation | forward time / Foundation |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name in variants:
        count, flops = rows[name]
        lines.append(f"| `{name}` | {REGISTRY[name].paper or 'not in the paper'} | {count.trainable:,} | "
                     f"{count.total:,} | {flops:.1f} | {flops / base_flops:.3f} | {seconds[name] / base_time:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=sorted(REGISTRY))
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=_size, default=(480, 640), help="HxW of the counted image")
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--time-model", default="vit_tiny_patch16_224")
    parser.add_argument("--time-size", type=_size, default=(224, 224))
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the timed forwards")
    parser.add_argument("--doc", help="write the table between the variant-cost markers of this Markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    text = report(args)
    print(text)
    if args.doc:
        write_section(args.doc, SECTION, invocation("benchmarks.variant_cost", argv), text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
