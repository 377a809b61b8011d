"""Trainable-parameter table of GoPT on a backbone, for the paper's datasets and intervals.

    python -m benchmarks.param_budget --model vit_base_patch16_224

Counts come from building the backbone and the adapters on the meta device (shapes only: no
forward, no weights, no memory; seconds even for a hybrid with its CNN stem).
"""

from __future__ import annotations

import argparse

import timm
import torch

from gopt_adapter import BackboneSpec, GoptAdapter, GoptConfig, count_parameters

DATASET_CLASSES = {"NYUDv2": 40, "SUN RGB-D": 37, "MFNet": 9, "PST900": 5, "WHU-OPT-SAR": 8}
INTERVALS = (1, 2, 4, 6, 12)
PAPER_BUDGET = 970_000


def adapter_parameters(spec: BackboneSpec, **config) -> int:
    return count_parameters(GoptAdapter(GoptConfig(**config), spec)).total


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vit_base_patch16_224")
    args = parser.parse_args(argv)
    with torch.device("meta"):
        spec = BackboneSpec.from_model(timm.create_model(args.model, pretrained=False, dynamic_img_size=True))
    stride = "x".join(map(str, spec.patch_size))
    print(f"Trainable parameters of GoPT on `{args.model}` (D={spec.embed_dim}, L={spec.depth}, token stride "
          f"{stride}), default options "
          f"(hidden_dim 32, SETR-naive head 256); * marks counts over the paper's 0.97M.\n")
    print("| aux channels | dataset (classes) | " + " | ".join(f"interval {i}" for i in INTERVALS) + " |")
    print("|---|---|" + "---|" * len(INTERVALS))
    for aux in (1, 3):
        for dataset, classes in DATASET_CLASSES.items():
            counts = [adapter_parameters(spec, aux_channels=aux, num_classes=classes, interval=i) for i in INTERVALS]
            cells = [f"{c:,}{' *' if c > PAPER_BUDGET else ''}" for c in counts]
            print(f"| {aux} | {dataset} ({classes}) | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
