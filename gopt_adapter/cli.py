"""The ``gopt`` command line."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="gopt", description="GoPT adapters for frozen timm ViTs")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="train foundation + GoPT on the built-in synthetic world (CPU, minutes)")
    demo.add_argument("--mode", default="depth", choices=("depth", "thermal", "sar"), help="auxiliary modality")
    demo.add_argument("--out", default="runs/demo", help="folder for checkpoints, logs and the adapter")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import DemoConfig, run_demo

        result = run_demo(replace(DemoConfig(), mode=args.mode, out=args.out, seed=args.seed),
                          progress=not args.no_progress)
        return 0 if result["reloaded_identical"] else 1
    return 2


if __name__ == "__main__":
    sys.exit(main())
