"""Which timm models `apply_gopt` wraps: a sweep over timm's registry, and the table in docs/api.md.

    python -m benchmarks.zoo                 # sweep, then write the table into docs/api.md

ViT-like rule: every name in ``timm.list_models()`` whose timm module (the file that registers
it) is one of :data:`VIT_MODULES`: the modules of timm's plain transformers, which embed the image
once into patch tokens and run one stack of attention blocks on them (ViT and its CNN-stem
hybrids, DeiT, Eva, Beit, Cait, ConVit, Xcit, NaFlexVit, the Qwen3/DeepSeek/Gemma4 ViTs), and of
the two that look like them but run several token streams (CrossVit, TNT). Hierarchical
transformers (:data:`HIERARCHICAL_MODULES`: Swin, Hiera, PVT, ... whose width changes between
stages) and every other module (:data:`OTHER_MODULES`: CNNs, MLP mixers, conv-attention hybrids)
are outside the sweep; ``tests/test_families.py`` checks that such models are refused.
``tests/test_zoo.py`` fails when timm adds a module that none of the three lists names.

Each model is built on the meta device (no memory, no weights; timm's truncated-normal
initialisers are skipped there) and handed to ``apply_gopt`` with one prompter (``interval`` = depth: the
decision to wrap or refuse does not depend on the interval). The outcome is acceptance or the
``TypeError`` that names the class and the reason.
"""

from __future__ import annotations

import argparse
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from benchmarks.markdown import invocation, write_section
from gopt_adapter import apply_gopt
from gopt_adapter.backbone import create_backbone

API_DOC = Path(__file__).resolve().parents[1] / "docs" / "api.md"
MARKER = "supported-models"

VIT_MODULES = frozenset({
    # one patch embedding, one stack of blocks on one token sequence
    "vision_transformer", "vision_transformer_hybrid", "vision_transformer_relpos",
    "vision_transformer_sam", "deit", "eva", "beit", "cait", "convit", "xcit", "naflexvit",
    "vitamin", "deepseek_vit", "gemma4_vit", "qwen3_vit",
    # several token streams
    "crossvit", "tnt",
})
HIERARCHICAL_MODULES = frozenset({
    "swin_transformer", "swin_transformer_v2", "swin_transformer_v2_cr",
    "hiera", "hieradet_sam2", "pvt_v2", "twins", "mvitv2", "pit", "levit", "volo", "nest",
    "tiny_vit",
})
OTHER_MODULES = frozenset({
    "byoanet", "byobnet", "coat", "convmixer", "convnext", "cpubone", "csatv2", "cspnet", "cspnext",
    "davit", "densenet", "dla", "dpn", "edgenext", "efficientformer", "efficientformer_v2",
    "efficientnet", "efficientvim", "efficientvit_mit", "efficientvit_msra", "fasternet", "fastvit",
    "focalnet", "gcvit", "ghostnet", "hardcorenas", "hgnet", "hrnet", "iformer", "inception_next",
    "inception_resnet_v2", "inception_v3", "inception_v4", "lcnetv2", "lowformer", "mambaout",
    "maxxvit", "metaformer", "mlp_mixer", "mobilenetv3", "mobilenetv5", "mobilevit", "nasnet",
    "nextvit", "nfnet", "pnasnet", "rdnet", "regnet", "repghost", "repvit", "res2net", "resnest",
    "resnet", "resnetv2", "rexnet", "selecsls", "senet", "sequencer", "shvit", "sknet", "starnet",
    "swiftformer", "tresnet", "vgg", "visformer", "vovnet", "xception", "xception_aligned",
})

REFUSAL = re.compile(r"^GoPT cannot wrap (?P<cls>[\w.]+): (?P<reason>.+?)\. Supported: .+\.$", re.S)


def registry_module(name: str) -> str:
    """The timm module that registers model ``name``."""
    from timm.models import get_arch_name
    from timm.models._registry import _model_to_module

    return _model_to_module[get_arch_name(name)]


def vit_like_names() -> list[str]:
    """Every registry name of a ViT-like class (the rule in the module docstring)."""
    import timm

    return [name for name in timm.list_models() if registry_module(name) in VIT_MODULES]


#: The initialisers of ``torch.nn.init`` that PyTorch's and timm's layers call while they are built.
_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "kaiming_uniform_",
                 "kaiming_normal_", "xavier_uniform_", "xavier_normal_", "orthogonal_")


@contextmanager
def skip_meta_init() -> Iterator[None]:
    """Weight initialisers do nothing to meta tensors while this is active.

    Meta tensors hold no values, yet ``torch.nn.init`` and timm's truncated normal run their
    ``uniform_``/``erfinv_``/``clamp_`` decompositions on them: most of the time it takes to build
    a ViT there. Modules call them through their modules' namespaces (``init.kaiming_uniform_``,
    timm's ``weight_init._trunc_normal_``), so those are what is swapped, and put back after.
    """
    from torch.nn import init
    from timm.layers import weight_init

    targets = [(weight_init, "_trunc_normal_")] + [(init, name) for name in _INITIALISERS]
    originals = [getattr(module, name) for module, name in targets]

    def skipping(original):
        def initialise(tensor, *args, **kwargs):
            return tensor if tensor.is_meta else original(tensor, *args, **kwargs)
        return initialise

    for (module, name), original in zip(targets, originals):
        setattr(module, name, skipping(original))
    try:
        yield
    finally:
        for (module, name), original in zip(targets, originals):
            setattr(module, name, original)


@dataclass(frozen=True)
class Outcome:
    """What ``apply_gopt`` did with one registry name."""

    name: str
    class_name: str  # e.g. "VisionTransformer"
    embedding: str  # the patch embedding, with a hybrid's CNN stem: "HybridEmbed(ResNetV2)"
    error: str | None  # the TypeError's message; None: wrapped
    untouched: bool  # after a refusal: module tree, flags and modes as before


def embedding_name(model: nn.Module) -> str:
    embed = getattr(model, "patch_embed", None)
    if embed is None:
        embed = getattr(model, "embeds", None)
    if embed is None:
        return "-"
    stem = getattr(embed, "backbone", None)
    return f"{type(embed).__name__}({type(stem).__name__})" if isinstance(stem, nn.Module) else type(embed).__name__


def _layout(model: nn.Module) -> list:
    return [(name, type(module), module.training) for name, module in model.named_modules()] + \
        [(name, p.requires_grad, p.shape) for name, p in model.named_parameters()]


def sweep_one(name: str) -> Outcome:
    """Builds ``name`` on the meta device and applies GoPT; any error but the refusal propagates."""
    with torch.device("meta"), skip_meta_init():
        model = create_backbone(name)
        blocks = getattr(model, "blocks", None)
        depth = len(blocks) if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) else 1
        before = _layout(model)
        outcome = dict(name=name, class_name=type(model).__name__, embedding=embedding_name(model))
        try:
            apply_gopt(model, aux_channels=1, num_classes=3, interval=depth)
        except TypeError as exc:
            return Outcome(**outcome, error=str(exc), untouched=_layout(model) == before)
    return Outcome(**outcome, error=None, untouched=True)


def sweep(names: Iterable[str]) -> list[Outcome]:
    return [sweep_one(name) for name in names]


def refusal_reason(message: str) -> str:
    """The ``<reason>`` of ``GoPT cannot wrap <class>: <reason>. Supported: ...``."""
    match = REFUSAL.match(message)
    if match is None:
        raise ValueError(f"not the documented refusal: {message!r}")
    return match["reason"]


def table(outcomes: Sequence[Outcome], examples: int = 3) -> str:
    """Markdown table: one row per class, patch embedding and outcome, with example names."""
    groups: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for outcome in outcomes:
        verdict = "wrapped" if outcome.error is None else f"refused: {refusal_reason(outcome.error)}"
        groups[(outcome.class_name, outcome.embedding, verdict)].append(outcome.name)
    lines = [
        f"{len(outcomes)} ViT-like names in timm's registry; "
        f"{sum(o.error is None for o in outcomes)} wrapped, {sum(o.error is not None for o in outcomes)} refused "
        "(hierarchical transformers such as Swin, Hiera or PVT are outside the sweep and refused: "
        "their width changes between stages).",
        "",
        "| class | patch embedding | names | examples | GoPT |",
        "|---|---|---|---|---|",
    ]
    order = sorted(groups, key=lambda key: (key[2] != "wrapped", key[0], key[1], key[2]))
    for class_name, embedding, verdict in order:
        names = sorted(groups[(class_name, embedding, verdict)])
        shown = ", ".join(f"`{n}`" for n in names[:examples]) + (", ..." if len(names) > examples else "")
        lines.append(f"| {class_name} | {embedding} | {len(names)} | {shown} | {verdict} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--doc", default=str(API_DOC), help="markdown file to write the table into")
    args = parser.parse_args(argv)
    body = table(sweep(vit_like_names()))
    write_section(args.doc, MARKER, invocation("benchmarks.zoo", argv), body)
    print(body)


if __name__ == "__main__":
    main()
