"""``python -m benchmarks.run``: ``gopt train`` under the benchmarks' name.

    python -m benchmarks.run --dataset nyudv2 --root /data/NYUDepthv2 \\
        --backbone vit_base_patch16_224.mae --weights mae_pretrain_vit_base.pth --variant gopt

The settings files are the package's ``gopt_adapter/configs/<dataset>.json``; the flags are
those of ``gopt train`` (``--help``), and the run is :func:`gopt_adapter.train.run.run`.
"""

from __future__ import annotations

import sys

from gopt_adapter.cli.commands import build_train_parser, train_main

PROG = "python -m benchmarks.run"


def parse_args(argv=None):
    return build_train_parser(PROG).parse_args(argv)


def main(argv=None) -> int:
    return train_main(sys.argv[1:] if argv is None else argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
