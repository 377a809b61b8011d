"""What each model does when the auxiliary sensor fails, on the built-in synthetic world:

    python -m benchmarks.robustness --out runs/robustness --doc docs/results.md

Each (world, variant, seed) run trains as in ``benchmarks.ablation`` (same foundation
pretraining, schedule and seeds), on the absolute worlds' full 384 training scenes (the ablation
halves them to fit its hour; one run here is evaluated under 13 conditions), then evaluates the
trained model on the validation scenes under every condition of :data:`gopt_adapter.data.aux_faults.ROBUSTNESS_FAULTS`:
clean aux, no aux (the aux-missing mode, which only an adapter trained with ``aux_dropout``
has), zeros, a flat frame, noise, holes and misregistration. The Foundation row sees RGB
alone: it is what a model without the second sensor gets, the line no condition should push
an RGB-X model below. ``--world relative`` adds the relative family's world. Runs are
resumable like the ablation's: every finished run leaves ``<out>/<world>/<variant>_s<seed>.json``
with the fingerprint of its settings, reused only while they stay the same.
"""

from __future__ import annotations

import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from gopt_adapter.data.aux_faults import ROBUSTNESS_FAULTS, FaultyAux, WithoutAux
from gopt_adapter.baselines import AUX_DROPOUT
from gopt_adapter.cli.demo import DemoConfig
from gopt_adapter.train.engine import evaluate

from .ablation import (SETUPS as ABLATION_SETUPS, AblationConfig, WorldSetup, build_parser, finish_run,
                       miou_record, run_benchmark, setup, train_run)
from .markdown import mean_std

VARIANTS = ("foundation", "gopt", "gopt_aux_dropout", "vpt_deep", "lora", "fft")
LABELS = {"foundation": "Foundation (RGB only)", "gopt": "GoPT", "gopt_aux_dropout": f"GoPT + aux_dropout {AUX_DROPOUT:g}",
          "vpt_deep": "VPT-Deep", "lora": "LoRA", "fft": "FFT"}
SECTION = "robustness"  # markers of the generated part of docs/results.md
_ABSOLUTE = ABLATION_SETUPS["absolute"]
#: The ablation's setups with the absolute worlds' 384 scenes and the demo's own foundation schedule
SETUPS: dict[str, WorldSetup] = {**ABLATION_SETUPS, "absolute": replace(_ABSOLUTE, demo=replace(
    _ABSOLUTE.demo, train_length=384, foundation=DemoConfig.foundation))}


def run_one(config: AblationConfig, world: str, variant: str, seed: int, weights: str, result: str) -> dict[str, Any]:
    """Trains one run as the ablation does, then evaluates it under every aux condition."""
    start = time.perf_counter()
    model, metrics, train, val = train_run(config, world, variant, seed, weights, Path(result).with_suffix(""))
    num_classes = len(val.class_names)
    has_missing_mode = getattr(getattr(model, "config", None), "has_missing_mode", False)
    clean = miou_record(metrics, val)  # the trainer's final evaluation is the clean condition
    conditions: dict[str, dict[str, float] | None] = {}
    for fault in ROBUSTNESS_FAULTS:
        if fault.kind == "clean" or (fault.kind == "missing" and variant == "foundation"):  # reads no aux
            conditions[fault.name] = clean
        elif fault.kind == "missing":
            conditions[fault.name] = (miou_record(evaluate(WithoutAux(model), val, num_classes), val)
                                      if has_missing_mode else None)
        else:
            conditions[fault.name] = miou_record(evaluate(model, FaultyAux(val, fault, seed), num_classes), val)
    return finish_run(config, result, world, variant, seed, model, train, start, **conditions["clean"],
                      conditions=conditions)


def report(config: AblationConfig, records: list[dict[str, Any]], wall_s: float, reused: int = 0) -> str:
    """Markdown: the settings, then per world one table of mIoU per model and aux condition."""
    names = [fault.name for fault in ROBUSTNESS_FAULTS]
    lines = [
        setup(config, records, wall_s, reused),
        "",
        "Aux conditions at inference, on the normalised aux image (`gopt_adapter.data.aux_faults.AuxFault`): "
        "*missing* runs `segmenter(rgb, aux=None)` (\"-\": the model has no aux-missing mode); *zeros* sets "
        "every value to 0; *mean* to the image mean; *noise s* adds Gaussian noise of standard deviation s; "
        "*holes p* sets 4x4-pixel squares, each with probability p, to the image minimum; *shift k px* moves "
        "the aux image k pixels right and down. The aux image spans [-1, 1] after normalisation.",
    ]
    for world in config.worlds:
        lines += ["", f"### {world} world: mIoU (%) per aux condition", "",
                  "| Model | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for variant in config.variants:
            group = [r for r in records if r["world"] == world and r["variant"] == variant]
            if not group:
                continue
            cells = []
            for name in names:
                values = [r["conditions"][name]["miou"] for r in group if r["conditions"][name] is not None]
                cells.append(mean_std(values) if len(values) == len(group) else "-")
            lines.append(f"| {LABELS.get(variant, variant)} | " + " | ".join(cells) + " |")
        lines += missing_split(config, [r for r in records if r["world"] == world], world)
    return "\n".join(lines) + "\n"


def missing_split(config: AblationConfig, records: list[dict[str, Any]], world: str) -> list[str]:
    """Markdown lines: without aux, mIoU on the classes RGB tells apart and on those only aux does."""
    lines = ["", f"Without aux on the {world} world, mIoU (%) on the classes RGB tells apart and on the classes "
             "only aux separates (models that can run without aux):", "",
             "| Model | RGB classes | aux classes |", "|---|---:|---:|"]
    missing = next(fault.name for fault in ROBUSTNESS_FAULTS if fault.kind == "missing")
    for variant in config.variants:
        group = [r["conditions"][missing] for r in records if r["variant"] == variant]
        if group and all(c is not None for c in group):
            lines.append(f"| {LABELS.get(variant, variant)} | {mean_std([c['miou_rgb_classes'] for c in group])} "
                         f"| {mean_std([c['miou_aux_classes'] for c in group])} |")
    return lines


def main(argv=None) -> int:
    parser = build_parser("python -m benchmarks.robustness", __doc__, VARIANTS, "runs/robustness", SETUPS)
    return run_benchmark("benchmarks.robustness", argv, parser, SECTION, run_one, report)


if __name__ == "__main__":
    sys.exit(main())
