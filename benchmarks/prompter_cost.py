"""Where one grouping prompter spends its time, at ViT-B shapes (the figures behind the
"Where the time goes" part of docs/performance.md):

    python -m benchmarks.prompter_cost --doc docs/performance.md

1. One prompter's forward at inference (batch 1), alone, and its cost per operator
   (``torch.profiler``, self CPU time divided by the number of forwards).
2. In place, training: a step (forward, loss, backward) of GoPT (a prompter before every
   block), GoPT-Shallow (one prompter) and VPT-Shallow at batch 2, interleaved, median; the
   difference between the first two, divided by the extra prompters, is what one prompter
   costs inside a training step.
3. Two choices behind those numbers: Gumbel noise from ``exponential_`` vs from ``rand``
   (:func:`gopt_adapter.grouping.gumbel_noise_like`), and CUP's attention over ``S + C``
   tokens through the fused ``scaled_dot_product_attention`` vs written out.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from typing import Callable

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from gopt_adapter import GoptConfig
from gopt_adapter.baselines import build_variant
from gopt_adapter.grouping import gumbel_noise_like
from gopt_adapter.prompter import GroupingPrompter, PromptState

from .markdown import invocation, write_section


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def prompter_forward(args) -> tuple[float, list[tuple[str, float]]]:
    """Median forward time of one prompter (ms) and its top operators (ms per forward)."""
    torch.manual_seed(0)
    tokens, classes = args.height // 16 * (args.width // 16), args.num_classes
    prompter = GroupingPrompter(GoptConfig(aux_channels=1, num_classes=classes), args.embed_dim).eval()
    x = torch.randn(1, 1 + tokens, args.embed_dim)  # [1, P + S, D]
    state = PromptState(torch.randn(1, tokens, 32), torch.randn(1, classes, 32))
    with torch.inference_mode():
        total = median_ms(lambda: prompter(x, 1, state), args.repeats * 10)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.repeats * 4):
                prompter(x, 1, state)
    per_op = sorted(((event.key, event.self_cpu_time_total / 1e3 / (args.repeats * 4)) for event in prof.key_averages()),
                    key=lambda item: -item[1])
    return total, per_op[:8]


def training_steps(args) -> dict[str, float]:
    """Median training-step time (s) per variant at batch 2, variants interleaved."""
    torch.manual_seed(0)
    base = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    size = (args.height, args.width)
    rgb, aux = torch.randn(2, 3, *size), torch.randn(2, 1, *size)
    target = torch.randint(0, args.num_classes, (2, *size))
    models = {name: build_variant(name, copy.deepcopy(base), 1, args.num_classes).train()
              for name in ("gopt", "gopt_shallow", "vpt_shallow")}
    for model in models.values():  # away from the zero init, so every prompter part gets gradients
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.add_(0.01 * torch.randn_like(param))
    times: dict[str, list[float]] = {name: [] for name in models}
    for repeat in range(args.step_repeats + 1):  # round 0 is warm-up
        for name, model in models.items():
            start = time.perf_counter()
            F.cross_entropy(model(rgb, aux), target).backward()
            model.zero_grad(set_to_none=True)
            if repeat:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def choices(args) -> dict[str, float]:
    logits = torch.empty(2, args.height // 16 * (args.width // 16), args.num_classes)
    z = torch.randn(1, args.height // 16 * (args.width // 16) + args.num_classes, 32)
    with torch.inference_mode():
        return {
            "gumbel_exponential_ms": median_ms(lambda: -torch.empty_like(logits).exponential_().log(), 50),
            "gumbel_rand_ms": median_ms(lambda: gumbel_noise_like(logits), 50),
            "attention_fused_ms": median_ms(lambda: F.scaled_dot_product_attention(z, z, z), 50),
            "attention_unfused_ms": median_ms(lambda: torch.softmax(z @ z.transpose(1, 2) * 32 ** -0.5, -1) @ z, 50),
        }


def report(args, forward_ms, per_op, steps, picks) -> str:
    extra = 12 - 1  # prompters of GoPT beyond GoPT-Shallow's one, on a 12-block ViT-B
    per_prompter_ms = 1e3 * (steps["gopt"] - steps["gopt_shallow"]) / extra
    lines = [
        f"ViT-B shapes: {args.height}x{args.width} (S = {args.height // 16 * (args.width // 16)} patch tokens), "
        f"C = {args.num_classes}, r = 32; CPU fp32, {torch.get_num_threads()} threads, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"measured {time.strftime('%Y-%m-%d')}.",
        "",
        f"One prompter, inference, batch 1: **{forward_ms:.2f} ms** per forward. Largest operators (self CPU "
        "time per forward, profiled):",
        "",
        "| operator | ms |",
        "|---|---:|",
        *(f"| `{name}` | {ms:.2f} |" for name, ms in per_op),
        "",
        f"Training step at batch 2 (median of {args.step_repeats}): GoPT {steps['gopt']:.2f} s, GoPT-Shallow "
        f"{steps['gopt_shallow']:.2f} s, VPT-Shallow {steps['vpt_shallow']:.2f} s; one prompter in place costs "
        f"**{per_prompter_ms:.0f} ms** of a step ((GoPT - GoPT-Shallow) / {extra}).",
        "",
        f"Gumbel noise on `[2, S, C]`: `exponential_` {picks['gumbel_exponential_ms']:.2f} ms, `rand` and two logs "
        f"{picks['gumbel_rand_ms']:.2f} ms. CUP's attention over `S + C` tokens: fused "
        f"`scaled_dot_product_attention` {picks['attention_fused_ms']:.2f} ms, written out "
        f"{picks['attention_unfused_ms']:.2f} ms.",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--embed-dim", type=int, default=768)
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=5, help="forward repeats (x10) and profiled forwards (x4)")
    parser.add_argument("--step-repeats", type=int, default=5, help="training steps per variant")
    parser.add_argument("--doc", help="also write the result into this Markdown file (e.g. docs/performance.md)")
    args = parser.parse_args(argv)
    args.height, args.width = args.size
    forward_ms, per_op = prompter_forward(args)
    text = report(args, forward_ms, per_op, training_steps(args), choices(args))
    print(text)
    if args.doc:
        write_section(args.doc, "prompter-cost", invocation("benchmarks.prompter_cost", argv), text)


if __name__ == "__main__":
    main()
