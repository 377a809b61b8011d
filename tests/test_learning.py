"""GoPT learns what only the aux image tells, on the synthetic world (a short real training).

The depth world has classes that share their colour exactly (picture/cabinet, rug/table), so
no RGB-only model can pass ``rgb_only_miou_bound`` (0.667). A frozen RGB foundation with a GoPT
adapter must pass it clearly; with ACP's query built from the RGB token alone (eq. 12 as
printed, ``acp_query="rgb"``) the aux image reaches a patch only through image-wide group
prompts, and the adapter stays at the bound (docs/method.md).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from gopt_adapter import apply_gopt
from gopt_adapter.cli.demo import (
    DemoConfig,
    build_foundation_backbone,
    class_miou,
    synthetic_datasets,
    train_foundation,
)
from gopt_adapter.train.engine import Dist, Trainer


def test_gopt_passes_the_rgb_only_bound_only_with_the_aligned_acp_query(tmp_path):
    base = DemoConfig()
    config = replace(base, train_length=128, val_length=48, out=str(tmp_path),
                     foundation=replace(base.foundation, epochs=3, eval_every=0, progress=False),  # evaluated once,
                     gopt=replace(base.gopt, epochs=8, eval_every=0, progress=False))  # at the end
    weights = tmp_path / "foundation.safetensors"
    train_foundation(config, weights, progress=False)
    train, val = synthetic_datasets(config)
    bound, aux_classes = train.rgb_only_miou_bound, sorted(train.aux_dependent_classes)
    scores = {}
    for query in ("aligned", "rgb"):
        torch.manual_seed(0)
        segmenter = apply_gopt(build_foundation_backbone(config, weights), train.aux_channels, train.num_classes,
                               acp_query=query)
        metrics = Trainer(segmenter, train, train.num_classes, replace(config.gopt, seed=0), tmp_path / query,
                          val_set=val, device="cpu", ctx=Dist()).fit()
        scores[query] = (metrics["miou"], class_miou(metrics, aux_classes))
    assert scores["aligned"][0] > bound + 0.1 and scores["aligned"][1] > 0.7, scores
    assert scores["rgb"][0] < bound + 0.02 and scores["rgb"][1] < 0.5, scores
