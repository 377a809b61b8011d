"""The registry-wide sweep, in two tiers.

Tier 1: every ViT-like name in timm's registry (the rule: ``benchmarks/zoo.py``) goes through
``apply_gopt`` on the meta device and is either wrapped or refused with the documented
``TypeError``, leaving the model as it was; the table in docs/api.md is that sweep's result.

Tier 2: a sample of small models (under ~30M parameters: registry names, shrunk with
``depth``/``embed_dim`` overrides where the registry has no small one), at least two per
class and every hybrid stem type, runs the whole contract on the CPU at 64x96: identity at init
against ``forward_intermediates(norm=True)``, logits at the input size, a training step that moves
only the adapter, an exact save/load round trip, and a bitwise ``remove_gopt``.
"""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from benchmarks import zoo
from model_helpers import assert_bitwise_equal, perturb_adapter, snapshot
from gopt_adapter import apply_gopt, load_adapter, remove_gopt, save_adapter
from gopt_adapter.backbone import BackboneSpec, create_backbone

SIZE = (64, 96)
SHRUNK = dict(depth=2)

# (registry name, constructor overrides); fixed-size classes get img_size=SIZE
SAMPLE: list[tuple[str, dict]] = [
    # VisionTransformer, plain patch embedding
    ("test_vit", {}),
    ("test_vit3", {}),
    ("vit_tiny_patch16_224", {}),
    ("deit_tiny_patch16_224", {}),
    ("vit_small_patch14_reg4_dinov2", dict(depth=4, dynamic_img_pad=True)),
    ("vit_wee_patch16_reg1_gap_256", dict(depth=4)),
    # VisionTransformer with a CNN stem (HybridEmbed), one per stem type
    ("vit_tiny_r_s16_p8_224", {}),  # ResNetV2 stem only (Sequential), stride 4, patch 8
    ("vit_small_r26_s32_224", dict(depth=4)),  # ResNetV2, stride 32
    ("vit_base_r50_s16_224", dict(depth=1)),  # ResNetV2, stride 16
    ("vit_small_resnet26d_224", dict(depth=1)),  # timm ResNet features (FeatureListNet)
    ("vitamin_small_224", dict(depth=4)),  # MbConvStages, no projection
    ("vit_base_mci_224", SHRUNK),  # MobileCLIP ConvStem, no projection
    # VisionTransformerDistilled
    ("deit_tiny_distilled_patch16_224", {}),
    ("deit_small_distilled_patch16_224", dict(depth=4)),
    # Eva
    ("eva02_tiny_patch14_224", dict(dynamic_img_pad=True)),
    ("vit_pe_core_tiny_patch16_384", dict(depth=4)),
    # Beit (fixed size)
    ("beit_base_patch16_224", dict(SHRUNK, img_size=SIZE)),
    ("beitv2_base_patch16_224", dict(SHRUNK, img_size=SIZE)),
    # VisionTransformerRelPos
    ("test_vit_relpos", {}),
    ("vit_srelpos_small_patch16_224", dict(depth=4)),
    ("vit_relpos_base_patch16_rpn_224", SHRUNK),
    # VisionTransformerSAM (fixed size)
    ("samvit_base_patch16", dict(SHRUNK, img_size=SIZE, global_attn_indexes=(1,), window_size=2)),
    ("samvit_base_patch16_224", dict(SHRUNK, img_size=SIZE, global_attn_indexes=(1,), window_size=2)),
    # Cait: the class token joins after `blocks`
    ("cait_xxs24_224", dict(SHRUNK, img_size=SIZE)),
    ("cait_xxs36_224", dict(SHRUNK, img_size=SIZE)),
    # ConVit: the class token joins at block local_up_to_layer (square inputs only)
    ("convit_tiny", dict(depth=3, local_up_to_layer=2, img_size=64)),
    ("convit_small", dict(depth=3, local_up_to_layer=1, img_size=64)),
    # Xcit: int patch_size, class token after `blocks`
    ("xcit_nano_12_p16_224", SHRUNK),
    ("xcit_nano_12_p8_224", SHRUNK),
    # NaFlexVit on image tensors
    ("naflexvit_base_patch16_gap", SHRUNK),
    ("naflexvit_base_patch16_par_gap", SHRUNK),
    # ViT encoders of the VLM families
    ("qwen3_vit_88m_enc", SHRUNK),
    ("qwen3_vit_306m_enc", dict(depth=1)),
    ("deepseek_vit_412m_enc", dict(depth=1, dynamic_img_pad=True)),
    ("gemma4_vit_167m_enc", dict(depth=1, global_pool="avg")),
    ("gemma4_vit_570m_enc", dict(depth=1, global_pool="avg", position_embedding_size=1024)),
]
SAMPLE_IDS = [name for name, _ in SAMPLE]
# heads that forward_intermediates never runs, left out of the size budget
UNUSED_HEADS = ("aligner.", "merger.")  # DeepSeek's aligner, Qwen3's patch merger


# ----------------------------------------------------------------------------- tier 1
@pytest.fixture(scope="module")
def outcomes() -> list[zoo.Outcome]:
    return zoo.sweep(zoo.vit_like_names())


def test_every_registry_module_is_classified():
    """A timm release with a new model module fails here until the module is put in a list."""
    lists = (zoo.VIT_MODULES, zoo.HIERARCHICAL_MODULES, zoo.OTHER_MODULES)
    assert all(not (a & b) for i, a in enumerate(lists) for b in lists[i + 1:])
    modules = {zoo.registry_module(name) for name in timm.list_models()}
    assert modules - set().union(*lists) == set()


def test_every_vit_like_name_is_wrapped_or_refused_as_documented(outcomes):
    assert len(outcomes) == len(zoo.vit_like_names()) > 300
    for outcome in outcomes:
        if outcome.error is None:
            continue
        match = zoo.REFUSAL.match(outcome.error)
        assert match is not None, f"{outcome.name}: {outcome.error}"
        assert match["cls"].endswith("." + outcome.class_name), outcome.name
        assert outcome.untouched, f"{outcome.name} was changed by the refusal"
    wrapped = {o.class_name for o in outcomes if o.error is None}
    assert wrapped >= {"VisionTransformer", "VisionTransformerDistilled", "Eva", "Beit", "VisionTransformerRelPos",
                       "VisionTransformerSAM", "Cait", "ConVit", "Xcit", "NaFlexVit", "Qwen3VitEncoder",
                       "DeepseekVitEncoder", "Gemma4VitEncoder"}
    hybrids = [o for o in outcomes if o.embedding.startswith("HybridEmbed")]
    assert len(hybrids) >= 27 and all(o.error is None for o in hybrids)


def test_sample_covers_every_wrapped_class_and_hybrid_stem(outcomes):
    """Tier 2 holds >= 2 models of each wrapped class (all of a class with fewer names)
    and every hybrid stem type the registry has."""
    by_name = {o.name: o for o in outcomes}
    assert set(SAMPLE_IDS) <= set(by_name)
    for cls in {o.class_name for o in outcomes if o.error is None}:
        registry = sum(o.class_name == cls for o in outcomes)
        sampled = sum(by_name[name].class_name == cls for name in SAMPLE_IDS)
        assert sampled >= min(2, registry), cls
    stems = {o.embedding for o in outcomes if o.embedding.startswith("HybridEmbed")}
    assert stems == {by_name[name].embedding for name in SAMPLE_IDS} & stems
    assert len(stems) >= 5


def test_api_doc_table_is_the_sweep(outcomes):
    """docs/api.md holds what `python -m benchmarks.zoo` writes for this sweep."""
    assert zoo.table(outcomes) in zoo.API_DOC.read_text()


# ----------------------------------------------------------------------------- tier 2
def build(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_backbone(name, backbone_kwargs=kwargs)


def sample_inputs(model, batch: int = 2):
    height, width = BackboneSpec.from_model(model).img_size or SIZE
    generator = torch.Generator().manual_seed(1)
    rgb = torch.randn(batch, 3, height, width, generator=generator)
    aux = torch.randn(batch, 1, height, width, generator=generator)
    labels = torch.randint(0, 3, (batch, height, width), generator=generator)
    return rgb, aux, labels


@pytest.mark.parametrize("name,kwargs", SAMPLE, ids=SAMPLE_IDS)
def test_sample_model_keeps_the_contract(name, kwargs, tmp_path):
    model = build(name, kwargs)
    assert sum(p.numel() for key, p in model.named_parameters() if not key.startswith(UNUSED_HEADS)) < 32e6
    original = snapshot(model)
    tree = [(key, type(module)) for key, module in model.named_modules()]
    rgb, aux, labels = sample_inputs(model)
    with torch.no_grad():
        reference = model.forward_intermediates(rgb, indices=1, norm=True, output_fmt="NCHW",
                                                intermediates_only=True)[-1]
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3, hidden_dim=8, head_channels=16)

    # identity at init, logits at the input size
    segmenter.eval()
    with torch.no_grad():
        features = segmenter.features(rgb, aux)
        logits = segmenter(rgb, aux)
    torch.testing.assert_close(features, reference, rtol=1e-5, atol=1e-5)
    assert logits.shape == (rgb.shape[0], 3, *rgb.shape[-2:])

    # one training step moves the adapter and nothing else
    segmenter.train()
    perturb_adapter(segmenter, std=0.02)  # move the zero up-projections so gradients reach every prompter
    adapter_before = snapshot(segmenter.adapter)
    optimizer = torch.optim.AdamW([p for p in segmenter.parameters() if p.requires_grad], lr=1e-3)
    F.cross_entropy(segmenter(rgb, aux), labels).backward()
    optimizer.step()
    assert all(p.grad is None for p in segmenter.backbone.parameters())
    assert_bitwise_equal(original, snapshot(segmenter.backbone))
    moved = [not torch.equal(a, b) for a, b in zip(adapter_before, snapshot(segmenter.adapter))]
    assert sum(moved) > len(moved) // 2

    # exact save/load round trip
    segmenter.eval()
    path = save_adapter(segmenter, tmp_path / "adapter.safetensors")
    saved = snapshot(segmenter.adapter)
    with torch.no_grad():
        before = segmenter(rgb, aux)
    perturb_adapter(segmenter, std=0.1, seed=5)
    load_adapter(segmenter, path)
    assert_bitwise_equal(saved, snapshot(segmenter.adapter))
    with torch.no_grad():
        assert torch.isfinite(before).all() and torch.equal(segmenter(rgb, aux), before)

    # remove_gopt gives the model back, bitwise
    restored = remove_gopt(segmenter)
    assert restored is model
    assert [(key, type(module)) for key, module in restored.named_modules()] == tree
    assert_bitwise_equal(original, snapshot(restored))


@pytest.mark.parametrize("name,kwargs", [
    ("crossvit_tiny_240", dict(img_size=SIZE)),
    ("tnt_s_patch16_224", dict(depth=1)),
    ("swin_tiny_patch4_window7_224", {}),
    ("twins_pcpvt_small", {}),
])
def test_refusals_leave_the_model_bitwise_untouched(name, kwargs):
    model = build(name, kwargs)
    before = snapshot(model)
    flags = [(key, p.requires_grad) for key, p in model.named_parameters()]
    tree = [(key, type(module), module.training) for key, module in model.named_modules()]
    with pytest.raises(TypeError, match=rf"^GoPT cannot wrap [\w.]*{type(model).__name__}: .+\. Supported: "):
        apply_gopt(model, aux_channels=1, num_classes=3)
    assert_bitwise_equal(before, snapshot(model))
    assert [(key, p.requires_grad) for key, p in model.named_parameters()] == flags
    assert [(key, type(module), module.training) for key, module in model.named_modules()] == tree


def test_parameters_doc_has_the_hybrid_table(capsys):
    """docs/parameters.md shows what `python -m benchmarks.param_budget --model vit_base_r50_s16_384` prints."""
    from benchmarks import param_budget

    param_budget.main(["--model", "vit_base_r50_s16_384"])
    printed = capsys.readouterr().out.strip()
    assert "token stride 16x16" in printed
    assert printed in (zoo.API_DOC.parent / "parameters.md").read_text()
