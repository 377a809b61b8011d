"""Command line: cut WHU-OPT-SAR scenes into 512x512 tiles with a seeded 60/20/20 split.

    python -m gopt_adapter.cli.tile_whu --root /data/WHU-OPT-SAR --out /data/whu_tiles

Prints one line per scene on stderr; interrupting and re-running the same command resumes
after the last finished scene. See :func:`gopt_adapter.data.whu_opt_sar.tile_whu_opt_sar`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from gopt_adapter.data.whu_opt_sar import tile_whu_opt_sar


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m gopt_adapter.cli.tile_whu",
        description="Cut WHU-OPT-SAR scenes (optical/ or image/, sar/, lbl/) into non-overlapping "
        "tiles, split them train/val/test with a fixed seed, and write OUT/index.json. Resumable.",
    )
    parser.add_argument("--root", required=True, help="folder with optical/ (or image/), sar/, lbl/")
    parser.add_argument("--out", required=True, help="output folder for tiles and index.json")
    parser.add_argument("--tile-size", type=int, default=512, help="tile side and stride in pixels (default 512)")
    parser.add_argument("--fractions", type=float, nargs=3, default=(0.6, 0.2, 0.2),
                        metavar=("TRAIN", "VAL", "TEST"), help="split fractions (default 0.6 0.2 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split permutation (default 0)")
    parser.add_argument("--split-by", choices=("tile", "scene"), default="tile",
                        help="permute tiles (paper, default) or whole scenes")
    parser.add_argument("--quiet", action="store_true", help="no per-scene progress lines")
    args = parser.parse_args(argv)
    index = tile_whu_opt_sar(
        args.root, args.out, tile_size=args.tile_size, fractions=tuple(args.fractions),
        seed=args.seed, split_by=args.split_by, progress=not args.quiet,
    )
    counts = {split: sum(t["split"] == split for t in index["tiles"]) for split in ("train", "val", "test")}
    print(f"{len(index['tiles'])} tiles from {len(index['scenes_done'])} scenes: {counts}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
