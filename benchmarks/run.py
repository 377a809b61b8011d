"""``python -m benchmarks.run``: the installed package's training recipe
(:mod:`gopt_adapter.recipe`, also ``gopt train``) under the benchmarks' name.

    python -m benchmarks.run --dataset nyudv2 --root /data/NYUDepthv2 \\
        --backbone vit_base_patch16_224.mae --weights mae_pretrain_vit_base.pth --variant gopt

The settings files are the package's ``gopt_adapter/configs/<dataset>.json``; the flags are
those of ``gopt train`` (``--help``).
"""

from __future__ import annotations

import sys

from gopt_adapter import recipe
from gopt_adapter.recipe import (  # noqa: F401 - the runner's names, for the suite and the tests
    ADAPTER_NAME,
    TRAINED_NAME,
    RunConfig,
    UsageError,
    build_backbone,
    build_datasets,
    build_transform_config,
    load_run_config,
    run,
)

PROG = "python -m benchmarks.run"


def parse_args(argv=None):
    return recipe.parse_args(argv, PROG)


def main(argv=None) -> int:
    return recipe.main(argv, PROG)


if __name__ == "__main__":
    sys.exit(main())
