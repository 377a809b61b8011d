"""Baselines (paper Table 4, Fig. 6-7, LoRA): one call, the right trainable set, identity at init."""

import sys

import pytest
import timm
import torch
import torch.nn.functional as F

from gopt_adapter import count_parameters
from gopt_adapter.baselines import (
    VARIANTS,
    BaselineSegmenter,
    build_foundation,
    build_lora,
    build_probe,
    build_variant,
    build_vpt,
)
from model_helpers import assert_bitwise_equal, family_inputs, make_backbone, snapshot

DEPTH, CLASSES, AUX = 4, 5, 1
D, PATCH, HEAD_CHANNELS = 32, 16, 256  # model_helpers.TINY width, vit_base_patch16 patch, default SETR head
LORA_R, AUX_DIM = 8, 32  # build_lora defaults
NEEDS_PEFT = {"lora"}
TOO_DEEP = {"gopt_i6", "gopt_i12"}  # interval > DEPTH
BUILDABLE = [name for name in VARIANTS if name not in TOO_DEEP]
FULL_FINETUNE = {"foundation", "fft", "fft_early"}
TWO_STREAM = {"fft"}  # starts as the mean of two streams, not as its RGB model (tests/test_two_stream.py)
TIMM_CLASSIFIER = ("backbone.head.", "backbone.fc_norm.")  # unused by dense features: stays frozen


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on a shared 2-core machine (5x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name, depth=DEPTH, family="vit", aux_channels=AUX, **options):
    if name in NEEDS_PEFT:
        pytest.importorskip("peft")
    model = make_backbone(family, depth=depth)
    if name.startswith("gopt"):
        options.setdefault("hidden_dim", 8)
    return build_variant(name, model, aux_channels, CLASSES, **options)


def reference_features(model, rgb):
    """The unwrapped timm model's dense features, as GoptSegmenter.backbone_features computes them."""
    return model.forward_intermediates(rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]


def expected_trainable(name, segmenter):
    """Independent statement of each variant's trainable set, by parameter name."""
    def trains(param_name):
        if param_name.startswith("adapters.default."):
            return True
        if name in FULL_FINETUNE:
            return not param_name.startswith(TIMM_CLASSIFIER)
        if name == "lora":
            return ".attn.qkv.lora_" in param_name or ".attn.proj.lora_" in param_name
        return False

    return {n for n, _ in segmenter.named_parameters() if trains(n)}


def backbone_weights(segmenter):
    """Snapshot of the backbone's own tensors (LoRA's added tensors left out)."""
    state = segmenter.backbone.state_dict()
    return [t.detach().clone() for key, t in state.items() if "lora_" not in key]


def head_params(classes=CLASSES, channels=HEAD_CHANNELS, dim=D):
    return dim * channels + channels + 2 * channels + channels * classes + classes  # conv, BN, conv


def full_aux_embed(aux=AUX, dim=D):
    return aux * PATCH * PATCH * dim + dim  # Conv2d(aux, D, 16, 16)


# ------------------------------------------------------------------- registry
def test_registry_covers_the_paper_rows_lora_and_the_interval_sweep():
    assert set(VARIANTS) == {
        "foundation", "probe", "fft", "fft_early", "vpt_shallow", "vpt_deep", "lora", "gopt", "gopt_shallow", "gopt_no_cup",
        "gopt_no_acp", "gopt_rgb_query", "gopt_aux_dropout", "gopt_soft", "gopt_i1", "gopt_i2", "gopt_i4", "gopt_i6", "gopt_i12",
    }
    assert all(variant.name == name for name, variant in VARIANTS.items())


def test_unknown_variant_raises_value_error_listing_the_names():
    with pytest.raises(ValueError, match="unknown variant 'vpt'") as info:
        build_variant("vpt", make_backbone("vit"), AUX, CLASSES)
    for name in VARIANTS:
        assert name in str(info.value)


def test_options_fixed_by_a_variant_cannot_be_overridden():
    with pytest.raises(ValueError, match="fixes"):
        build_variant("gopt_i2", make_backbone("vit"), AUX, CLASSES, interval=1)
    with pytest.raises(ValueError, match="fixes"):
        build_variant("vpt_deep", make_backbone("vit"), AUX, CLASSES, deep=False)
    with pytest.raises(ValueError, match="interval"):
        build_variant("gopt_shallow", make_backbone("vit"), AUX, CLASSES, interval=1)


@pytest.mark.parametrize("name", sorted(TOO_DEEP))
def test_interval_larger_than_depth_raises_and_fits_a_deeper_backbone(name):
    with pytest.raises(ValueError, match="exceeds the backbone depth"):
        build(name)
    interval = int(name.removeprefix("gopt_i"))
    assert build(name, depth=12).adapter.block_indices == tuple(range(0, 12, interval))


def test_gopt_variants_carry_their_config():
    assert build("gopt_shallow").adapter.block_indices == (0,)
    assert build("gopt").adapter.block_indices == tuple(range(DEPTH))
    assert build("gopt_i2").adapter.block_indices == (0, 2)
    assert build("gopt_no_cup").config.use_cup is False
    assert build("gopt_no_acp").config.use_acp is False
    assert build("gopt_soft").config.assignment == "soft"


# -------------------------------------------------------------- every variant
@pytest.mark.parametrize("name", BUILDABLE)
def test_output_shape_and_trainable_set(name):
    segmenter = build(name)
    rgb, aux = family_inputs("vit")
    assert segmenter(rgb, aux).shape == (rgb.shape[0], CLASSES, *rgb.shape[-2:])
    trainable = {n for n, p in segmenter.named_parameters() if p.requires_grad}
    assert trainable == expected_trainable(name, segmenter)
    backbone_trainable = [p.requires_grad for n, p in segmenter.backbone.named_parameters() if ".blocks." in f".{n}"]
    if name in FULL_FINETUNE:
        assert all(backbone_trainable)
    elif name != "lora":
        assert not any(backbone_trainable)


@pytest.mark.parametrize("name", BUILDABLE)
def test_training_reaches_and_moves_exactly_the_trainable_set(name):
    segmenter = build(name)
    frozen_before = backbone_weights(segmenter)
    trainable = {n: p for n, p in segmenter.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trainable.items()}
    rgb, aux = family_inputs("vit")
    target = torch.randint(0, CLASSES, (rgb.shape[0], *rgb.shape[-2:]), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.05)
    segmenter.train()
    if name in FULL_FINETUNE:
        assert segmenter.backbone.training
    else:
        assert not any(m.training for m in segmenter.backbone.modules()), "frozen backbone left eval mode"
    for step in range(3):
        optimizer.zero_grad()
        F.cross_entropy(segmenter(rgb, aux), target).backward()
        if step == 0:
            for n, p in segmenter.named_parameters():
                assert (p.grad is not None) == (n in trainable), n
        optimizer.step()
    unmoved = [n for n, p in trainable.items() if torch.equal(p, before[n])]
    assert unmoved == []
    if name not in FULL_FINETUNE:
        assert_bitwise_equal(frozen_before, backbone_weights(segmenter))
    segmenter.eval()
    assert not any(m.training for m in segmenter.modules())


@pytest.mark.parametrize("name", [name for name in BUILDABLE if name not in TWO_STREAM])
def test_identity_at_init(name):
    """At init every variant computes its RGB model: the unwrapped backbone's features, and the
    logits of its own head on them (aux contributions, LoRA and GoPT prompts start at zero)."""
    if name in NEEDS_PEFT:
        pytest.importorskip("peft")
    model = make_backbone("vit", depth=DEPTH)
    rgb, aux = family_inputs("vit")
    with torch.no_grad():
        expected = reference_features(model, rgb)
        segmenter = build_variant(name, model, AUX, CLASSES, **({"hidden_dim": 8} if name.startswith("gopt") else {}))
        segmenter.eval()
        features = segmenter.features(rgb, aux)
        logits = segmenter(rgb, aux)
        expected_logits = segmenter.upsample(segmenter.adapter.head(expected), rgb.shape[-2:])
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fft_early", "vpt_shallow", "vpt_deep", "lora"])
@pytest.mark.parametrize("family", ["deit_distilled", "dinov2_reg", "samvit"])
def test_prefix_tokens_padding_and_token_maps(name, family):
    """Two prefix tokens, padded patch-14 grids and SAM's [B, h, w, D] maps: identity at init,
    then the aux weights change the features."""
    if name in NEEDS_PEFT:
        pytest.importorskip("peft")
    model = make_backbone(family)
    rgb, aux = family_inputs(family)
    with torch.no_grad():
        expected = reference_features(model, rgb)
        segmenter = build_variant(name, model, AUX, CLASSES).eval()
        torch.testing.assert_close(segmenter.features(rgb, aux), expected, rtol=1e-5, atol=1e-6)
        assert segmenter(rgb, aux).shape == (rgb.shape[0], CLASSES, *rgb.shape[-2:])
        generator = torch.Generator().manual_seed(0)
        for n, p in segmenter.named_parameters():
            if p.requires_grad and ".head." not in n:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
        assert not torch.allclose(segmenter.features(rgb, aux), expected)


# ---------------------------------------------------------- parameter counts
def test_parameter_counts_match_the_formulas():
    aux = 3  # HHA-like, so the aux channel count shows up in the formulas
    tiny_backbone = make_backbone("vit", depth=DEPTH)
    backbone_total = sum(p.numel() for p in tiny_backbone.parameters())
    classifier = sum(p.numel() for n, p in tiny_backbone.named_parameters() if n.startswith(("head.", "fc_norm.")))
    feature_path = backbone_total - classifier
    expected = {
        "foundation": feature_path + head_params(),
        "probe": head_params(),  # the frozen backbone and GoPT's default head: nothing else trains
        "fft_early": feature_path + full_aux_embed(aux) + head_params(),
        # a private copy of each LayerNorm (2 per block, the final one), the aux patch embedding, the fusion
        "fft": feature_path + (2 * DEPTH + 1) * 2 * D + full_aux_embed(aux) + D + head_params(),
        "vpt_shallow": full_aux_embed(aux) + head_params(),
        "vpt_deep": DEPTH * full_aux_embed(aux) + head_params(),
    }
    for name, trainable in expected.items():
        count = count_parameters(build(name, aux_channels=aux))
        assert count.trainable == trainable, name
        assert count.total == backbone_total + (trainable - feature_path if name in FULL_FINETUNE else trainable), name


def test_lora_parameter_count_matches_the_formula():
    pytest.importorskip("peft")
    aux = 3
    backbone_total = sum(p.numel() for p in make_backbone("vit", depth=DEPTH).parameters())
    lora = DEPTH * (LORA_R * (D + 3 * D) + LORA_R * (D + D))  # qkv: D -> 3D, proj: D -> D
    narrow = aux * PATCH * PATCH * AUX_DIM + AUX_DIM + 2 * AUX_DIM + AUX_DIM * D + D  # conv, LayerNorm, up
    count = count_parameters(build("lora", aux_channels=aux))
    assert count.trainable == lora + narrow + head_params()
    assert count.total == backbone_total + count.trainable


# ---------------------------------------------------------- variant specifics
@pytest.mark.parametrize("name", ["foundation", "probe"])
def test_rgb_only_variants_ignore_aux_but_check_it_like_every_variant(name):
    segmenter = build(name).eval()
    rgb, aux = family_inputs("vit")
    with torch.no_grad():
        torch.testing.assert_close(segmenter(rgb, aux), segmenter(rgb, torch.randn_like(aux)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="wrong aux channel count"):
        segmenter(rgb, aux.repeat(1, 3, 1, 1))
    hha = build_foundation(make_backbone("vit"), CLASSES, aux_channels=3) if name == "foundation" else \
        build_probe(make_backbone("vit"), 3, CLASSES)
    assert hha(rgb, aux.repeat(1, 3, 1, 1)).shape[1] == CLASSES


def test_probe_is_gopts_head_on_the_frozen_backbone():
    """The probe's head is the one GoPT builds by default (same type, same shapes), the backbone
    stays in eval mode while the head trains, and the registry marks the backbone frozen."""
    from gopt_adapter import apply_gopt

    probe = build("probe").train()
    gopt_head = apply_gopt(make_backbone("vit", depth=DEPTH), AUX, CLASSES, hidden_dim=8).adapter.head
    assert type(probe.adapter.head) is type(gopt_head)
    assert [p.shape for p in probe.adapter.head.parameters()] == [p.shape for p in gopt_head.parameters()]
    assert probe.adapter.head.training and not probe.backbone.training
    assert VARIANTS["probe"].frozen_backbone and VARIANTS["probe"].paper is None


@pytest.mark.parametrize("name", ["fft", "fft_early", "vpt_deep", "lora", "gopt"])
def test_inputs_are_checked_by_the_shared_segmenter(name):
    segmenter = build(name)
    rgb, aux = family_inputs("vit")
    with pytest.raises(ValueError, match="wrong aux channel count"):
        segmenter(rgb, aux.repeat(1, 2, 1, 1))
    with pytest.raises(ValueError, match="share batch and spatial size"):
        segmenter(rgb, aux[..., :-16])
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        segmenter(rgb[..., :-1], aux[..., :-1])


def test_vpt_is_shallow_or_deep_and_refuses_non_bool():
    assert len(build("vpt_shallow").adapter.embeds) == 1
    assert len(build("vpt_deep").adapter.embeds) == DEPTH
    with pytest.raises(ValueError, match="deep must be a bool"):
        build_vpt(make_backbone("vit"), AUX, CLASSES, deep=1)


def test_lora_sits_on_the_attention_projections_only():
    pytest.importorskip("peft")
    segmenter = build("lora")
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in segmenter.backbone.named_modules() if n.endswith(".lora_A")}
    assert adapted == {f"blocks.{i}.block.attn.{m}" for i in range(DEPTH) for m in ("qkv", "proj")}


def test_lora_rejects_targets_that_are_not_attention_linears_before_changing_the_model():
    pytest.importorskip("peft")
    model = make_backbone("vit")
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"attention linears are \['proj', 'qkv'\]"):
        build_lora(model, AUX, CLASSES, target_modules=("q_proj",))
    assert_bitwise_equal(before, snapshot(model))
    assert not any("lora_" in n for n, _ in model.named_modules())


@pytest.mark.parametrize("name", ["foundation", "vpt_deep", "lora"])
def test_unsupported_or_already_wrapped_models_are_refused_unchanged(name):
    if name in NEEDS_PEFT:
        pytest.importorskip("peft")
    with pytest.raises(TypeError, match="ConvNeXt"):
        build_variant(name, timm.create_model("convnext_atto", pretrained=False), AUX, CLASSES)
    segmenter = build("gopt")
    before = snapshot(segmenter.backbone)
    with pytest.raises(ValueError, match="already has GoPT applied; a baseline needs a model of its own"):
        build_variant(name, segmenter.backbone, AUX, CLASSES)
    assert_bitwise_equal(before, snapshot(segmenter.backbone))
    with pytest.raises(TypeError, match="a baseline needs a timm model"):
        build_variant(name, "vit.safetensors", AUX, CLASSES)


def test_lora_without_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft -> ImportError
    with pytest.raises(ImportError, match=r"gopt-adapter\[peft\]"):
        build_lora(make_backbone("vit"), AUX, CLASSES)


def test_baselines_refuse_the_gopt_adapter_file_format(tmp_path):
    """save_adapter / load_adapter on a baseline raise AdapterError naming the variant, and write
    nothing; a baseline has none of GoptSegmenter's adapter-file or multi-adapter methods."""
    from gopt_adapter import AdapterError, GoptSegmenter, load_adapter, save_adapter

    gopt = build("gopt")
    save_adapter(gopt, tmp_path / "gopt.safetensors")
    segmenter = build("vpt_shallow")
    assert isinstance(segmenter, BaselineSegmenter) and not isinstance(segmenter, GoptSegmenter)
    before = snapshot(segmenter)
    with pytest.raises(AdapterError, match="'vpt_shallow' baseline.*torch.save"):
        save_adapter(segmenter, tmp_path / "vpt.safetensors")
    with pytest.raises(AdapterError, match="load_adapter .*'vpt_shallow' baseline"):
        load_adapter(segmenter, tmp_path / "gopt.safetensors")
    assert not (tmp_path / "vpt.safetensors").exists()
    assert_bitwise_equal(before, snapshot(segmenter))
    for method in ("save_pretrained", "from_pretrained", "add_adapter", "set_adapter", "forward_mixed"):
        assert not hasattr(segmenter, method), method


def test_gopt_aux_dropout_costs_the_missing_mode_more_than_gopt_on_vit_b():
    """The figure in docs/benchmarks.md's variant table (ViT-B, 40 classes, 1 aux channel): the
    token (32) and the RGB patch embedding (3 * 16 * 16 * 32 + 32, LayerNorm 64)."""
    with torch.device("meta"):
        counts = {name: count_parameters(build_variant(name, timm.create_model("vit_base_patch16_224", num_classes=0),
                                                       1, 40)).trainable for name in ("gopt", "gopt_aux_dropout")}
    assert counts == {"gopt": 937_224, "gopt_aux_dropout": 937_224 + 32 + 24_608 + 64}
