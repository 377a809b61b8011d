"""Forward-time cost of the GoPT prompters against the same frozen backbone + head without them.

    python -m benchmarks.forward_overhead --model vit_base_patch16_224 --size 480 640 --repeats 9

Both variants run in one process on one segmenter, interleaved, after warm-up; the report is
the median time of each and their ratio (target: <= 1.10 on CPU fp32, batch 1).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import timm
import torch

from gopt_adapter import apply_gopt, count_parameters


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224", help="timm model name (random weights)")
    parser.add_argument("--size", type=int, nargs=2, default=(480, 640), metavar=("H", "W"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--num-classes", type=int, default=40)
    parser.add_argument("--aux-channels", type=int, default=1)
    parser.add_argument("--interval", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, dynamic_img_size=True)
    segmenter = apply_gopt(model, args.aux_channels, args.num_classes, args.interval).eval()
    rgb = torch.randn(args.batch, 3, *args.size)
    aux = torch.randn(args.batch, args.aux_channels, *args.size)

    def frozen() -> torch.Tensor:  # lower bound: same backbone and head, no prompter
        return segmenter.upsample(segmenter.adapter.head(segmenter.backbone_features(rgb)), args.size)

    def gopt() -> torch.Tensor:
        return segmenter(rgb, aux)

    times = {"frozen": [], "gopt": []}
    with torch.inference_mode():
        for _ in range(args.warmup):
            frozen(), gopt()
        for _ in range(args.repeats):
            for name, fn in (("frozen", frozen), ("gopt", gopt)):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    ratio = median["gopt"] / median["frozen"]
    params = count_parameters(segmenter)
    print(f"model {args.model}, input {args.batch}x3x{args.size[0]}x{args.size[1]}, fp32, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, torch {torch.__version__}")
    print(f"trainable parameters: {params.trainable:,}")
    print("| variant | median forward (s) | ratio |")
    print("|---|---|---|")
    print(f"| frozen backbone + head | {median['frozen']:.3f} | 1.00 |")
    print(f"| GoPT (interval {args.interval}) | {median['gopt']:.3f} | {ratio:.3f} |")
    return {"median": median, "ratio": ratio}


if __name__ == "__main__":
    main()
