"""The two-stream FFT (Table 4 "FFT" after CEN): what it computes at init, the exchange, the
penalty, the gradients, the checks, and a short training run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F

from gopt_adapter import count_parameters
from gopt_adapter.baselines import TwoStreamSegmenter, build_fft, build_variant
from gopt_adapter.data import get_dataset
from gopt_adapter.train.engine import Dist, TrainConfig, Trainer
from gopt_adapter.data.transforms import build_transforms, default_train_config
from gopt_adapter.baselines.two_stream import ModalityLayerNorm
from model_helpers import assert_bitwise_equal, family_inputs, make_backbone, snapshot

CLASSES, D = 5, 32
DOCS = Path(__file__).resolve().parents[1] / "docs"


@pytest.fixture(autouse=True)
def _threads(one_thread):
    yield


def reference_features(model, rgb):
    return model.forward_intermediates(rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]


def exchanged_model(threshold, ratio=0.0, family="vit", aux_channels=1):
    """An FFT on ``family`` whose block-1 norm1 and final norm have gains under 0.1 on chosen channels."""
    segmenter = build_fft(make_backbone(family), aux_channels, CLASSES, exchange_threshold=threshold,
                          exchange_ratio=ratio).eval()
    with torch.no_grad():
        for norm in (segmenter.backbone.blocks[1].block.norm1, segmenter.backbone.norm):
            norm.weight[[0, 3, 20]] = 0.05  # 0, 3: RGB share (exchanged); 20: aux share (never for RGB)
            norm.aux_weight[[5, 20, 30]] = -0.05  # 20, 30: aux share (exchanged); 5: RGB share
    return segmenter


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "dinov2_reg"])
def test_at_init_without_exchange_the_streams_are_the_foundation_on_rgb_and_on_grey_aux(family):
    """Prefix tokens (class + distillation, registers) and padded patch-14 grids included."""
    rgb, aux = family_inputs(family, aux_channels=2)
    aux[:, 1] = aux[:, 0]  # two equal aux channels: their embedding is the RGB embedding of a grey picture
    reference = make_backbone(family)
    with torch.no_grad():
        expected_rgb = reference_features(reference, rgb)
        expected_aux = reference_features(reference, aux[:, :1].expand(-1, 3, -1, -1))
        segmenter = build_fft(make_backbone(family), 2, CLASSES, exchange_threshold=0, exchange_ratio=0).eval()
        rgb_stream, aux_stream = segmenter.stream_features(rgb, aux)
        fused = segmenter.features(rgb, aux)
        logits = segmenter(rgb, aux)
    torch.testing.assert_close(rgb_stream, expected_rgb, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(aux_stream, expected_aux, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fused, (expected_rgb + expected_aux) / 2, rtol=1e-5, atol=1e-5)  # sigmoid(0) = 1/2
    assert logits.shape == (rgb.shape[0], CLASSES, *rgb.shape[-2:])


@pytest.mark.parametrize("threshold, ratio", [(0.1, 0.0), (0.0, 2 / 16), (0.1, 2 / 16)])
def test_the_exchange_moves_exactly_the_selected_channels_of_each_stream(threshold, ratio):
    """CEN's threshold, our share of smallest gains (2 of each 16-channel share), or both."""
    rgb, aux = family_inputs("vit")
    with torch.no_grad():
        apart = exchanged_model(0.0)  # same weights, exchange off
        exchanged = exchanged_model(threshold, ratio)
        apart_rgb, apart_aux = apart.stream_features(rgb, aux)
        # the final norm is the last layer: with the others' exchange off, it shows channel by channel
        for norm in exchanged.exchange_norms()[:-1]:
            norm.threshold = norm.ratio = 0.0
        rgb_stream, aux_stream = exchanged.stream_features(rgb, aux)
    rgb_taken, aux_taken = [0, 3], [20, 30]
    torch.testing.assert_close(rgb_stream[:, rgb_taken], apart_aux[:, rgb_taken], rtol=0, atol=0)
    torch.testing.assert_close(aux_stream[:, aux_taken], apart_rgb[:, aux_taken], rtol=0, atol=0)
    keep_rgb = [c for c in range(D) if c not in rgb_taken]
    keep_aux = [c for c in range(D) if c not in aux_taken]
    torch.testing.assert_close(rgb_stream[:, keep_rgb], apart_rgb[:, keep_rgb], rtol=0, atol=0)
    torch.testing.assert_close(aux_stream[:, keep_aux], apart_aux[:, keep_aux], rtol=0, atol=0)
    assert not torch.equal(apart_aux[:, rgb_taken], apart_rgb[:, rgb_taken])  # the swap is visible
    norm = exchanged.backbone.norm
    assert [m.nonzero().flatten().tolist() for m in norm.exchange_masks()] == [rgb_taken, aux_taken]


def test_modality_layer_norm_against_a_written_out_layer_norm():
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.LayerNorm(8, eps=1e-6)
    with torch.no_grad():
        base.weight.copy_(torch.tensor([0.01, 1.0, 2.0, -0.01, 0.5, 0.01, 1.5, -2.0]))
        base.bias.normal_(generator=generator)
    norm = ModalityLayerNorm(base, threshold=0.02, ratio=0.0)
    with torch.no_grad():
        norm.aux_weight.copy_(torch.tensor([0.01, 1.0, 1.0, 1.0, 0.3, 0.01, -0.01, 1.0]))
    x = torch.randn(4, 3, 8, generator=generator)  # two streams of batch 2
    hat = (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + 1e-6)
    rgb = hat[:2] * base.weight + base.bias
    aux = hat[2:] * norm.aux_weight + norm.aux_bias
    expected_rgb, expected_aux = rgb.clone(), aux.clone()
    expected_rgb[..., [0, 3]] = aux[..., [0, 3]]  # RGB share 0..3, |gain| < 0.02
    expected_aux[..., [5, 6]] = rgb[..., [5, 6]]  # aux share 4..7
    with torch.no_grad():
        torch.testing.assert_close(norm(x), torch.cat([expected_rgb, expected_aux]), rtol=1e-5, atol=1e-5)
    expected_penalty = base.weight[:4].abs().sum() + norm.aux_weight[4:].abs().sum()
    torch.testing.assert_close(norm.penalty(), expected_penalty)
    assert norm.weight is base.weight  # the RGB stream keeps the backbone's tensor
    with pytest.raises(ValueError, match="two stacked streams"):
        norm(x[:3])
    equal = ModalityLayerNorm(torch.nn.LayerNorm(8), threshold=0.0, ratio=0.5)  # all gains 1: ties by index
    assert [m.nonzero().flatten().tolist() for m in equal.exchange_masks()] == [[0, 1], [4, 5]]
    with torch.no_grad():
        equal.weight[2] = 0.5  # now the smallest of the RGB share
    assert equal.exchange_masks()[0].nonzero().flatten().tolist() == [0, 2]


def test_gradients_reach_both_streams_norms_the_aux_embedding_and_the_fusion():
    segmenter = build_variant("fft", make_backbone("vit"), 1, CLASSES).train()
    rgb, aux = family_inputs("vit")
    target = torch.randint(0, CLASSES, (rgb.shape[0], *rgb.shape[-2:]), generator=torch.Generator().manual_seed(0))
    (F.cross_entropy(segmenter(rgb, aux), target) + segmenter.regularization_loss()).backward()
    norms = segmenter.exchange_norms()
    assert len(norms) == 2 * 2 + 1  # norm1, norm2 of two blocks, and the final norm
    for norm in norms:
        for param in (norm.weight, norm.bias, norm.aux_weight, norm.aux_bias):
            assert param.grad is not None and param.grad.abs().sum() > 0
    for param in (segmenter.adapter.aux_embed.proj.weight, segmenter.adapter.fusion.logit):
        assert param.grad is not None and param.grad.abs().sum() > 0
    expected = segmenter.exchange_l1 * sum(n.weight[: D // 2].abs().sum() + n.aux_weight[D // 2:].abs().sum()
                                           for n in norms)
    torch.testing.assert_close(segmenter.regularization_loss(), expected)


def test_inputs_and_models_are_checked_before_anything_changes():
    segmenter = build_variant("fft", make_backbone("vit"), 1, CLASSES)
    rgb, aux = family_inputs("vit")
    with pytest.raises(ValueError, match="wrong aux channel count"):
        segmenter(rgb, aux.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="no aux-missing mode"):
        segmenter(rgb, None)
    assert not hasattr(segmenter, "backbone_features")  # two stacked streams only: no single-stream pass
    sam = make_backbone("samvit")
    with pytest.raises(TypeError, match="fft_early"):
        build_variant("fft", sam, 1, CLASSES)
    model = make_backbone("vit")
    before = snapshot(model)
    for bad in (-1.0, True, "0.1"):
        with pytest.raises(ValueError, match="exchange_threshold"):
            build_fft(model, 1, CLASSES, exchange_threshold=bad)
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"exchange_ratio must be a number in \[0, 1\)"):
            build_fft(model, 1, CLASSES, exchange_ratio=bad)
    with pytest.raises(ValueError, match="already has GoPT applied"):
        build_fft(segmenter.backbone, 1, CLASSES)
    assert_bitwise_equal(before, snapshot(model))
    assert not any(isinstance(m, ModalityLayerNorm) for m in model.modules())


def test_it_is_a_baseline_without_mixed_batches():
    """Mixed-task batches are GoptSegmenter's (many adapters on one frozen backbone); a baseline
    holds one model and does not inherit them."""
    segmenter = build_variant("fft", make_backbone("vit"), 1, CLASSES)
    assert not hasattr(segmenter, "forward_mixed") and not hasattr(segmenter, "add_adapter")


def test_it_trains_with_the_trainer_and_the_loss_falls(tmp_path):
    crop = default_train_config("synthetic", crop_size=(32, 32))
    train = get_dataset("synthetic", split="train", mode="depth", size=32, length=32, seed=0,
                        transform=build_transforms("synthetic", True, crop))
    model = build_variant("fft", make_backbone("vit"), train.aux_channels, len(train.class_names), head_channels=16)
    assert isinstance(model, TwoStreamSegmenter)
    penalty_before = float(model.regularization_loss().detach())
    config = TrainConfig(epochs=3, batch_size=8, lr=3e-3, warmup_steps=2, log_every=1, progress=False, amp=False)
    Trainer(model, train, len(train.class_names), config, tmp_path, device="cpu", ctx=Dist()).fit()
    steps = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    first, last = (sum(r["loss"] for r in steps if r.get("epoch") == e and r["event"] == "train") for e in (1, 3))
    assert last < first
    assert float(model.regularization_loss().detach()) < penalty_before  # the L1 term pulls the shared gains down


def doc_trainable(variant):
    row = next(line for line in (DOCS / "benchmarks.md").read_text().splitlines() if line.startswith(f"| `{variant}` |"))
    return int(row.rstrip(" |").rsplit("|", 1)[1].strip().replace(",", ""))


def test_the_documented_counts_of_both_ffts_on_vit_b():
    """docs/benchmarks.md's variant table: ViT-B, 40 classes, one aux channel."""
    with torch.device("meta"):
        counts = {name: count_parameters(build_variant(name, timm.create_model("vit_base_patch16_224", num_classes=0),
                                                       1, 40)) for name in ("foundation", "fft", "fft_early")}
    for name in ("fft", "fft_early"):
        assert counts[name].trainable == doc_trainable(name), name
    # FFT: the foundation, plus a private copy of 25 LayerNorms (2 x 768 each), the aux patch
    # embedding Conv2d(1, 768, 16, 16) and the fusion's 768 logits
    aux_embed = 16 * 16 * 768 + 768
    assert counts["fft"].trainable == counts["foundation"].trainable + 25 * 2 * 768 + aux_embed + 768
    assert counts["fft_early"].trainable == counts["foundation"].trainable + aux_embed
    assert re.search(r"\| `fft` \| Table 4 FFT \|", (DOCS / "benchmarks.md").read_text())


def test_activation_checkpointing_gives_the_same_gradients():
    rgb, aux = family_inputs("vit")
    grads = []
    for checkpointing in (False, True):
        segmenter = build_fft(make_backbone("vit"), 1, CLASSES, exchange_threshold=1.5).train()  # gains of 1: all exchange
        segmenter.set_grad_checkpointing(checkpointing)
        torch.manual_seed(0)
        segmenter(rgb, aux).square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in segmenter.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
