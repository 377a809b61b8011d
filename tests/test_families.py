"""apply_gopt on every supported timm family: identity at init, shapes, errors, removal."""

import pytest
import timm
import torch

from gopt_adapter import apply_gopt, count_parameters, remove_gopt
from model_helpers import FAMILIES, assert_bitwise_equal, family_inputs, make_backbone, perturb_adapter, snapshot


def reference_features(model, rgb):
    return model.forward_intermediates(rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_identity_at_init_and_output_shapes(family):
    """Right after apply_gopt the features equal the unwrapped model's; logits match the input size."""
    model = make_backbone(family)
    rgb, aux = family_inputs(family)
    with torch.no_grad():
        expected = reference_features(model, rgb)
        segmenter = apply_gopt(model, aux_channels=1, num_classes=6, hidden_dim=8, head_channels=16).eval()
        features = segmenter.features(rgb, aux)
        logits = segmenter(rgb, aux)
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
    assert logits.shape == (rgb.shape[0], 6, *rgb.shape[-2:])
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("family", ["vit", "deit_distilled", "dinov2_reg", "eva02", "beit", "samvit"])
def test_prompts_change_patch_tokens_but_never_prefix_tokens(family):
    """Once the up-projections move, features change; prefix tokens entering each block do not."""
    model = make_backbone(family)
    rgb, aux = family_inputs(family)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3, hidden_dim=8).eval()
    seen = []
    block = segmenter.backbone.blocks[0].block
    handle = block.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    with torch.no_grad():
        plain = segmenter.features(rgb, aux)
        perturb_adapter(segmenter, std=0.2)
        prompted = segmenter.features(rgb, aux)
    handle.remove()
    assert not torch.allclose(plain, prompted)
    prefix = segmenter.spec.num_prefix_tokens
    if prefix:
        torch.testing.assert_close(seen[0][:, :prefix], seen[1][:, :prefix], rtol=0, atol=0)
        assert not torch.equal(seen[0][:, prefix:], seen[1][:, prefix:])


@pytest.mark.parametrize("name", ["swin_tiny_patch4_window7_224", "hiera_tiny_224", "resnet18", "convnext_atto"])
def test_unsupported_models_raise_type_error_naming_the_class(name):
    model = timm.create_model(name, pretrained=False)
    with pytest.raises(TypeError, match=type(model).__name__ + ".*Supported"):
        apply_gopt(model, aux_channels=1, num_classes=3)


def test_input_errors_name_both_shapes():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3)
    rgb, aux = family_inputs("vit")
    cases = [
        (rgb, aux.repeat(1, 3, 1, 1), "aux channel count"),
        (rgb, aux[:1], "batch and spatial size"),
        (rgb, aux[..., :32], "batch and spatial size"),
        (rgb[:, :1], aux, "RGB channel count"),
        (rgb[0], aux, "expected rgb"),
    ]
    for r, a, fragment in cases:
        with pytest.raises(ValueError, match=fragment) as info:
            segmenter(r, a)
        assert str(tuple(r.shape)) in str(info.value) and str(tuple(a.shape)) in str(info.value)


def test_size_errors_for_fixed_and_undivisible_inputs():
    vit = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3)
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        vit(torch.zeros(1, 3, 50, 64), torch.zeros(1, 1, 50, 64))
    beit = apply_gopt(make_backbone("beit"), aux_channels=1, num_classes=3)
    with pytest.raises(ValueError, match="fixed input size"):
        beit(torch.zeros(1, 3, 48, 64), torch.zeros(1, 1, 48, 64))


def test_applying_twice_is_refused():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3)
    with pytest.raises(ValueError, match="already has GoPT applied"):
        apply_gopt(segmenter.backbone, aux_channels=1, num_classes=3)


@pytest.mark.parametrize("family", ["vit", "eva02", "samvit"])
def test_remove_gopt_restores_the_original_model(family):
    """Module tree, state-dict keys, requires_grad flags, mode and bitwise tensors come back."""
    model = make_backbone(family)
    model.train()
    model.pos_embed.requires_grad_(False) if getattr(model, "pos_embed", None) is not None else None
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    keys = list(model.state_dict())
    tree = [(name, type(module)) for name, module in model.named_modules()]
    before = snapshot(model)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3, hidden_dim=8)
    assert count_parameters(segmenter.backbone).trainable == 0
    perturb_adapter(segmenter)
    rgb, aux = family_inputs(family)
    segmenter(rgb, aux).sum().backward()
    restored = remove_gopt(segmenter)
    assert restored is model
    assert [(name, type(module)) for name, module in restored.named_modules()] == tree
    assert list(restored.state_dict()) == keys
    assert {name: p.requires_grad for name, p in restored.named_parameters()} == flags
    assert restored.training
    assert_bitwise_equal(before, snapshot(restored))
    with pytest.raises(ValueError, match="already removed"):
        remove_gopt(segmenter)


def test_remove_gopt_restores_every_submodules_mode():
    """A model in eval mode except one submodule (a block's MLP, e.g. left training by the user)
    comes back with exactly those per-module modes, whatever train()/eval() ran in between."""
    model = make_backbone("vit").eval()
    model.blocks[1].mlp.train()
    modes = [(name, module.training) for name, module in model.named_modules()]
    assert any(training for _, training in modes) and not all(training for _, training in modes)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3, hidden_dim=8)
    segmenter.train()
    segmenter.eval()
    segmenter.train()
    assert [(name, module.training) for name, module in remove_gopt(segmenter).named_modules()] == modes


def hybrid(dynamic_img_pad: bool = False):
    """vit_tiny_r_s16_p8: a ResNetV2 stem of stride 4, then an 8x8 projection: tokens 32 px apart."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_r_s16_p8_224", pretrained=False, num_classes=0, depth=2,
                             dynamic_img_size=True, dynamic_img_pad=dynamic_img_pad).eval()


def test_hybrid_aux_token_covers_the_pixels_of_its_rgb_token():
    """Kernel = stride = stem stride x patch size: one changed aux pixel changes exactly the aux
    conv's token at the position of the RGB token those pixels belong to, on the same grid (the
    scene normalisation after the conv then reads every token relative to the image)."""
    segmenter = apply_gopt(hybrid(), aux_channels=1, num_classes=3, hidden_dim=8).eval()
    assert segmenter.spec.patch_size == (32, 32) and segmenter.spec.in_chans == 3
    rgb, aux = torch.randn(1, 3, 64, 96), torch.randn(1, 1, 64, 96)
    with torch.no_grad():
        grid = segmenter.features(rgb, aux).shape[-2:]
        conv = segmenter.adapter.aux_embed.proj
        tokens = conv(aux).flatten(2)  # [1, r, S]
        for y, x in [(0, 0), (40, 70), (63, 95)]:
            moved = aux.clone()
            moved[..., y, x] += 1.0
            changed = (conv(moved).flatten(2) - tokens).abs().sum(1)[0].nonzero().flatten()
            assert changed.tolist() == [(y // 32) * grid[1] + x // 32]
    assert tuple(grid) == (2, 3) and tokens.shape[-1] == 6


def test_padded_hybrid_pads_like_its_stem():
    """With dynamic_img_pad the stem's feature map is padded: multiples of the stem stride (4) work."""
    model = hybrid(dynamic_img_pad=True)
    rgb, aux = torch.randn(2, 3, 64, 84), torch.randn(2, 1, 64, 84)  # 84 = 21 x 4, not a multiple of 32
    with torch.no_grad():
        expected = reference_features(model, rgb)
        segmenter = apply_gopt(model, aux_channels=1, num_classes=3, hidden_dim=8).eval()
        torch.testing.assert_close(segmenter.features(rgb, aux), expected, rtol=1e-5, atol=1e-6)
        assert segmenter(rgb, aux).shape == (2, 3, 64, 84)
    with pytest.raises(ValueError, match=r"not divisible by the multiple it needs \(4, 4\)"):
        segmenter(rgb[..., :82], aux[..., :82])


def test_late_class_token_is_never_prompted():
    """ConVit inserts its class token at block local_up_to_layer: blocks before it get every token
    prompted, blocks from it on all but the class token (which enters block 1 as inserted)."""
    torch.manual_seed(0)
    model = timm.create_model("convit_tiny", pretrained=False, num_classes=0, depth=3, local_up_to_layer=1,
                              img_size=64).eval()
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3, hidden_dim=8).eval()
    assert segmenter.spec.block_prefix_tokens == (0, 1, 1)
    seen = {0: [], 1: []}
    handles = [segmenter.backbone.blocks[i].block.register_forward_pre_hook(
        lambda module, args, i=i: seen[i].append(args[0].detach().clone())) for i in seen]
    rgb, aux = torch.randn(2, 3, 64, 64), torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        segmenter.features(rgb, aux)
        perturb_adapter(segmenter, std=0.2)
        segmenter.features(rgb, aux)
    for handle in handles:
        handle.remove()
    assert seen[0][0].shape[1] == 16 and (seen[0][0] - seen[0][1]).abs().sum(-1).all()
    assert seen[1][0].shape[1] == 17 and torch.equal(seen[1][0][:, 0], seen[1][1][:, 0])
    assert (seen[1][0][:, 1:] - seen[1][1][:, 1:]).abs().sum(-1).all()
