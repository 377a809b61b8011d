"""The README's prediction panel: the demo's adapter on a synthetic scene, through ``gopt predict``.

    gopt demo && python -m benchmarks.demo_panel --out docs/images/demo_panel.png

Picks the validation scene (at ``--size``, twice the demo's training size by default) that
shows the most of the classes only depth separates, writes it as real image files (8-bit
RGB PNG, 16-bit depth PNG), runs ``gopt predict`` on them with the demo's foundation weights
and adapter, copies the panel to ``--out`` and prints the pixel accuracy against the scene's
labels.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from gopt_adapter.cli.commands import main as gopt
from gopt_adapter.data import get_dataset
from gopt_adapter.cli.demo import DemoConfig


def pick_scene(dataset, min_pixels: int) -> int:
    """Index of the first scene with the most aux-dependent classes covering ``min_pixels`` each."""
    classes = sorted(dataset.aux_dependent_classes)

    def shown(index: int) -> int:
        counts = torch.bincount(dataset[index]["label"].flatten(), minlength=dataset.num_classes)
        return int((counts[classes] >= min_pixels).sum())

    return max(range(len(dataset)), key=lambda index: (shown(index), -index))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo", default="runs/demo", help="the folder gopt demo wrote")
    parser.add_argument("--out", default="docs/images/demo_panel.png", help="where to copy the panel")
    parser.add_argument("--size", type=int, default=128, help="scene size in pixels")
    parser.add_argument("--scenes", type=int, default=64, help="validation scenes to pick from")
    args = parser.parse_args(argv)
    demo, config = Path(args.demo), DemoConfig()
    dataset = get_dataset("synthetic", split="val", mode=config.mode, size=args.size, length=args.scenes,
                          seed=config.seed)
    index = pick_scene(dataset, min_pixels=args.size ** 2 // 50)  # 2% of the scene
    sample = dataset[index]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        rgb = (sample["rgb"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)  # [H, W, 3]
        depth = (sample["aux"][0].numpy() * 65535).round().astype(np.uint16)  # [H, W], read back / 65535
        Image.fromarray(rgb).save(tmp / "scene.png")
        Image.fromarray(depth).save(tmp / "scene_depth.png")
        status = gopt(["predict", "--backbone", config.backbone, "--backbone-kwargs", json.dumps(config.backbone_kwargs),
                       "--weights", str(demo / "foundation_vit.safetensors"),
                       "--adapter", str(demo / "gopt_adapter.safetensors"), "--class-names", f"synthetic:{config.mode}",
                       "--no-progress", str(tmp / "scene.png"), str(tmp / "scene_depth.png"), "-o", str(tmp / "out")])
        if status:
            return status
        predicted = np.array(Image.open(tmp / "out" / "scene_label.png"))
        shutil.copyfile(tmp / "out" / "scene_panel.png", args.out)
    accuracy = float((predicted == sample["label"].numpy()).mean())
    print(f"validation scene {index} at {args.size}x{args.size}: pixel accuracy {100 * accuracy:.1f}%; panel: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
