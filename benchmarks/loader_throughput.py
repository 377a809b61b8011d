"""Loader throughput: samples/s of ``__getitem__`` for every reader and the synthetic world.

For each dataset a tiny copy of its layout is written to a temporary folder at the real
resolution and in the real formats (random pixel content, which decodes somewhat slower
than natural images as JPEG/PNG compress it poorly), then every sample is read ``--repeats``
times, without transforms and with the default training transforms
(``gopt_adapter.data.transforms.build_transforms(name, train=True)``). The median over repeats is
reported as a Markdown table. By default torch runs single-threaded, as inside a
``DataLoader`` worker, so the numbers are per worker.

    python -m benchmarks.loader_throughput            # full table
    python -m benchmarks.loader_throughput --quick    # smaller images, fewer repeats
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from gopt_adapter.data import SegDataset, get_dataset, tile_whu_opt_sar  # noqa: E402
from gopt_adapter.data.transforms import build_transforms, default_train_config  # noqa: E402
from tests.datasets_helpers import make_mfnet, make_nyudv2, make_pst900, make_whu_scenes  # noqa: E402

# name -> (height, width) of a sample at the dataset's real resolution
REAL_SIZES = {
    "nyudv2": (480, 640),
    "sunrgbd": (530, 730),
    "mfnet": (480, 640),
    "pst900": (720, 1280),
    "whu_opt_sar": (512, 512),
}


def build_layout(name: str, root: Path, n: int, size: tuple[int, int]) -> tuple[Path, str]:
    """Write a layout copy with ``n`` training samples; return (root to read, split)."""
    h, w = size
    stems = [f"{i:05d}" for i in range(n)]
    if name == "nyudv2":
        make_nyudv2(root, {"train": stems}, h, w)
    elif name == "sunrgbd":
        make_nyudv2(root, {"train": stems}, h, w, label_folder="labels", num_classes=37)
    elif name == "mfnet":
        make_mfnet(root, {"train": [s + "D" for s in stems]}, h, w)
    elif name == "pst900":
        make_pst900(root, {"train": stems}, h, w)
    elif name == "whu_opt_sar":
        # one scene holding n tiles in a row, tiled with the real command
        make_whu_scenes(root / "src", ["scene"], h, w * n)
        tile_whu_opt_sar(root / "src", root / "tiles", tile_size=h, fractions=(1.0, 0.0, 0.0), progress=False)
        return root / "tiles", "train"
    else:
        raise ValueError(name)
    return root, "train"


def samples_per_second(dataset: SegDataset, repeats: int, count: int) -> float:
    """Median over ``repeats`` of (count / seconds) for reading ``count`` samples in order."""
    dataset[0]  # warm-up (imports, caches)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in range(count):
            dataset[i % len(dataset)]
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def run(repeats: int, samples: int, quick: bool, synthetic_length: int, log: Callable[[str], None]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, size in REAL_SIZES.items():
            if quick:
                size = (size[0] // 4, size[1] // 4)
            root, split = build_layout(name, Path(tmp) / name, samples, size)
            raw = get_dataset(name, root=root, split=split)
            crop = default_train_config(name).crop_size
            if quick:
                crop = (crop[0] // 4, crop[1] // 4)
            train = get_dataset(name, root=root, split=split, transform=build_transforms(
                name, train=True, config=default_train_config(name, crop_size=crop)))
            row = {"dataset": name, "size": size, "crop": crop, "aux": raw.aux_channels,
                   "raw": samples_per_second(raw, repeats, len(raw)),
                   "train": samples_per_second(train, repeats, len(train))}
            log(f"{name}: {row['raw']:.1f} / {row['train']:.1f} samples/s")
            rows.append(row)
    for mode in ("depth", "thermal", "sar"):
        raw = get_dataset("synthetic", mode=mode, size=128, length=synthetic_length)
        train = get_dataset("synthetic", mode=mode, size=128, length=synthetic_length,
                            transform=build_transforms("synthetic", train=True))
        row = {"dataset": f"synthetic ({mode})", "size": (128, 128), "crop": (128, 128), "aux": 1,
               "raw": samples_per_second(raw, repeats, synthetic_length),
               "train": samples_per_second(train, repeats, synthetic_length)}
        log(f"synthetic {mode}: {row['raw']:.1f} / {row['train']:.1f} samples/s")
        rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| dataset | sample HxW | aux ch | train crop | samples/s, read only | samples/s, read + train transforms | ms/sample (train) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['size'][0]}x{r['size'][1]} | {r['aux']} | {r['crop'][0]}x{r['crop'][1]} "
            f"| {r['raw']:.1f} | {r['train']:.1f} | {1000 / r['train']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.loader_throughput",
        description="Measure samples/s of __getitem__ (read only, and with the training transforms) for each "
        "reader on a generated layout copy at real resolution, and for the synthetic world at 128x128. "
        "Prints a Markdown table (median over repeats).",
    )
    parser.add_argument("--repeats", type=int, default=5, help="timed passes over each dataset (default 5)")
    parser.add_argument("--samples", type=int, default=8, help="samples per generated layout copy (default 8)")
    parser.add_argument("--synthetic-length", type=int, default=200, help="synthetic samples per pass (default 200)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1, as in a DataLoader worker)")
    parser.add_argument("--quick", action="store_true", help="quarter-size images and crops (smoke test)")
    args = parser.parse_args(argv)
    if min(args.repeats, args.samples, args.synthetic_length, args.threads) < 1:
        parser.error("--repeats, --samples, --synthetic-length and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    logging.getLogger("gopt_adapter.data").setLevel(logging.ERROR)  # tiny copies: split-size notices
    rows = run(args.repeats, args.samples, args.quick, args.synthetic_length,
               lambda msg: print(msg, file=sys.stderr, flush=True))
    print(f"torch {torch.__version__}, {args.threads} thread(s), Python {platform.python_version()}, "
          f"{platform.machine()}; median of {args.repeats} passes\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
