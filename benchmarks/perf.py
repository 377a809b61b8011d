"""Cost of GoPT against the alternatives, measured side by side in one process.

    python -m benchmarks.perf --model vit_base_patch16_224 --size 480 640   # the reference setting
    python -m benchmarks.perf --quick                                       # vit_tiny at 224x224

For each variant: trainable parameters, adapter size (bytes of the trained tensors as one
safetensors file), GFLOPs per image and inference forward time as a ratio to the lower bound
(batch 1), training step time (forward, loss, backward, AdamW step) and
training memory as ratios to full fine-tuning (batch 2 on CPU), and the adapter swap times
(``load_adapter`` of a saved adapter onto the resident backbone, ``set_adapter`` between two
resident adapters). Timings are medians of interleaved repeats after warm-up: each round
times every forward ``--forward-repeats`` times and every training step once, each sweep over
the models starting one model later, and the report states the per-call spread of the lower
bound's forward so that a reader can tell a difference from noise.

The inference columns are ``gopt bench``'s (``gopt_adapter.cli.bench``): its FLOP count, its
timed forward (no gradients), and its ``--vs probe`` reference as the lower bound, the frozen
backbone with GoPT's head on RGB and no prompter. So a wheel's ``gopt bench --vs probe`` measures
what this table's GoPT row shows, one variant at a time; this command interleaves the variants
round by round instead, so that a noisy machine slows them alike.

Training memory on CPU is counted, not sampled: bytes of the tensors autograd saves for
backward (unique storages, the model's own weights and buffers left out: they are resident
whatever trains) plus gradients and AdamW state of the trainable parameters, i.e. what a
training step needs on top of the model's weights. On CUDA (``--device cuda``, bf16
autocast) it is ``torch.cuda.max_memory_allocated`` of the step above the resident model
instead, and images/s is reported as well.

``vpt_shallow`` is in the table as the floor of every method that trains something before
block 0 of a frozen backbone: backward must still run through all the frozen blocks.

``--doc docs/performance.md`` writes the table into that file, between markers named after
the model, size and device, leaving the rest of the file as it is.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

from gopt_adapter import count_parameters, load_adapter, save_adapter
from gopt_adapter.baselines import build_variant
from gopt_adapter.cli.bench import gflops_per_image, timed_call
from gopt_adapter.train.engine import trainable_state_dict
from gopt_adapter.atomic_files import tensors_bytes

from .markdown import invocation, write_section

VARIANTS = ("gopt", "gopt_shallow", "vpt_shallow", "vpt_deep", "lora", "fft_early")


@dataclass
class Row:
    name: str
    model: torch.nn.Module
    trainable: int
    adapter_bytes: int
    forward_s: list[float]
    step_s: list[float]
    memory_bytes: int = 0
    gflops: float = 0.0


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--quick", action="store_true", help="vit_tiny_patch16_224 at 224x224")
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--train-batch", type=int, default=None, help="default: 2 on CPU, 16 on CUDA")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--forward-repeats", type=int, default=3,
                        help="timed forwards of each model per round (a forward is cheap next to a training step)")
    parser.add_argument("--swap-repeats", type=int, default=50)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), help=f"subset of {VARIANTS}")
    parser.add_argument("--doc", help="also write the table into this Markdown file (e.g. docs/performance.md)")
    args = parser.parse_args(argv)
    for flag in ("repeats", "forward_repeats", "swap_repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')} must be at least 1")
    if args.quick:
        args.model, args.size = "vit_tiny_patch16_224", (224, 224)
    return args


def counted_training_memory(model: torch.nn.Module, rgb, aux, target) -> int:
    resident = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in resident:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        F.cross_entropy(model(rgb, aux), target)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return sum(storages.values()) + 3 * trainable  # activations + grads + AdamW (exp_avg, exp_avg_sq)


def main(argv=None) -> None:
    args = parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    batch = args.train_batch or (16 if cuda else 2)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda)
    torch.manual_seed(0)
    base = timm.create_model(args.model, pretrained=False, num_classes=0, dynamic_img_size=True)
    size = tuple(args.size)
    rgb1, aux1 = torch.randn(1, 3, *size, device=device), torch.randn(1, 1, *size, device=device)
    rgb, aux = torch.randn(batch, 3, *size, device=device), torch.randn(batch, 1, *size, device=device)
    target = torch.randint(0, args.num_classes, (batch, *size), device=device)

    rows: list[Row] = []
    for name in args.variants:
        model = build_variant(name, copy.deepcopy(base), 1, args.num_classes).to(device)
        params = count_parameters(model)
        rows.append(Row(name, model, params.trainable, len(tensors_bytes(trainable_state_dict(model))), [], [],
                        gflops=gflops_per_image(model.eval(), rgb1, aux1)))
    # the lower bound is what ``gopt bench --vs probe`` measures: the frozen backbone and GoPT's head on RGB
    probe = build_variant("probe", copy.deepcopy(base), 1, args.num_classes).to(device).eval()
    probe_gflops = gflops_per_image(probe, rgb1, aux1)
    probe_forward: list[float] = []
    optimizers = {row.name: torch.optim.AdamW([p for p in row.model.parameters() if p.requires_grad], lr=1e-6)
                  for row in rows}

    def step(row: Row):
        row.model.train()
        with autocast:
            loss = F.cross_entropy(row.model(rgb, aux).float(), target)
        loss.backward()
        optimizers[row.name].step()
        optimizers[row.name].zero_grad(set_to_none=True)

    forwards = [(row.model, row.forward_s) for row in rows] + [(probe, probe_forward)]
    for repeat in range(args.repeats + 1):  # the first round is warm-up
        with torch.no_grad(), autocast:  # as gopt bench times a forward
            for sweep in range(args.forward_repeats):
                for model, times in rotated(forwards, repeat * args.forward_repeats + sweep):
                    model.eval()
                    elapsed = timed_call(lambda: model(rgb1, aux1), device)
                    if repeat:
                        times.append(elapsed)
        for row in rotated(rows, repeat):
            elapsed = timed_call(lambda: step(row), device)
            if repeat:
                row.step_s.append(elapsed)

    for row in rows:
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base_memory = torch.cuda.memory_allocated(device)
            step(row)
            torch.cuda.synchronize(device)
            row.memory_bytes = torch.cuda.max_memory_allocated(device) - base_memory
        else:
            row.memory_bytes = counted_training_memory(row.model.train(), rgb, aux, target)

    swap = measure_swaps(rows, args.swap_repeats, rgb1, aux1)
    text = report(args, device, batch, rows, (probe_gflops, probe_forward), swap)
    print(text)
    if args.doc:
        key = f"perf:{args.model}:{args.size[0]}x{args.size[1]}:{device.type}"
        write_section(args.doc, key, invocation("benchmarks.perf", argv), text)


def rotated(items: list, shift: int) -> list:
    """``items`` started at index ``shift`` (mod its length): each sweep of the interleaved
    timings starts one model later, so that no model always runs right after the same one."""
    shift %= len(items)
    return items[shift:] + items[:shift]


def measure_swaps(rows: list[Row], repeats: int, rgb1=None, aux1=None,
                  device: torch.device = torch.device("cpu")) -> dict[str, float]:
    """Median ``load_adapter`` and ``set_adapter`` times (ms) on the ``gopt`` row's model,
    synchronising ``device`` around each call (a load copies the tensors onto it)."""
    gopt = next((row.model for row in rows if row.name == "gopt"), None)
    if gopt is None:
        return {}
    with tempfile.TemporaryDirectory() as tmp:
        path = save_adapter(gopt, Path(tmp) / "task.safetensors")
        gopt.backbone_fingerprint()  # the digest is computed once per backbone, not per swap
        load_times = [timed_call(lambda: load_adapter(gopt, path), device) for _ in range(repeats)]
        gopt.add_adapter("other", path)
        set_times = []
        for index in range(repeats):
            set_times.append(timed_call(lambda: gopt.set_adapter("other" if index % 2 == 0 else "default"),
                                         device))
        gopt.set_adapter("default")
        gopt.delete_adapter("other")
    return {"load_adapter_ms": 1e3 * statistics.median(load_times), "set_adapter_ms": 1e3 * statistics.median(set_times)}


def report(args, device, batch, rows: list[Row], probe: tuple[float, list[float]], swap: dict[str, float]) -> str:
    """The measurements as Markdown: a header line naming the setting and machine, a table, swaps.
    ``probe`` is the lower bound's GFLOPs per image and forward times."""
    fft = next((row for row in rows if row.name == "fft_early"), None)
    probe_gflops, probe_forward = probe
    lower = statistics.median(probe_forward)
    lines = [
        f"`{args.model}`, {args.size[0]}x{args.size[1]}, {device.type}"
        f"{' bf16' if device.type == 'cuda' else ' fp32'}, inference batch 1, training batch {batch}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"median of {args.repeats} training steps and {len(probe_forward)} forwards per model, "
        f"measured {time.strftime('%Y-%m-%d')}",
        "",
    ]
    memory = "training memory (counted)" if device.type == "cpu" else "peak CUDA memory"
    lines += [f"| variant | trainable params | adapter size | GFLOPs/img | inference vs lower bound | "
              f"train step vs FFT | {memory} vs FFT |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    lines.append(f"| lower bound (`gopt bench --vs probe`: frozen backbone + head) | - | - | {probe_gflops:.3g} | "
                 f"1.00 ({lower:.3f} s) | - | - |")
    for row in rows:
        forward = statistics.median(row.forward_s)
        step = statistics.median(row.step_s)
        cells = [
            f"{forward / lower:.3f}",
            f"{step / statistics.median(fft.step_s):.3f}" if fft else f"{step:.3f} s",
            f"{row.memory_bytes / fft.memory_bytes:.3f}" if fft else f"{row.memory_bytes / 1e6:.0f} MB",
        ]
        extra = f" ({batch / step:.1f} img/s)" if device.type == "cuda" else ""
        lines.append(f"| {row.name} | {row.trainable:,} | {row.adapter_bytes / 1e6:.2f} MB | {row.gflops:.3g} | "
                     + " | ".join(cells[:2]) + extra + f" | {cells[2]} ({row.memory_bytes / 1e6:.0f} MB) |")
    spread = statistics.median(abs(t - lower) for t in probe_forward) / lower
    lines += ["", f"One forward of the lower bound varies by {100 * spread:.1f}% (median absolute deviation "
                  f"over its {len(probe_forward)} calls): the noise in a single timing on this machine."]
    if swap:
        lines += ["", f"Swap, GoPT adapter: `load_adapter` {swap['load_adapter_ms']:.2f} ms, "
                      f"`set_adapter` {swap['set_adapter_ms']:.3f} ms (median of {args.swap_repeats})."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
