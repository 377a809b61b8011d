"""Training behaviour: what gets gradients, what moves, what stays frozen, determinism."""

import copy

import pytest
import torch

from gopt_adapter import apply_gopt, remove_gopt
from model_helpers import assert_bitwise_equal, family_inputs, make_backbone, perturb_adapter, snapshot

CONFIGS = [
    dict(),
    dict(assignment="soft"),
    dict(use_cup=False),
    dict(use_acp=False, head="linear"),
    dict(interval=2, num_groups=3),
]


def train_steps(segmenter, steps=3, lr=1e-2, seed=0):
    rgb, aux = family_inputs("vit", batch=2)
    target = torch.randint(0, segmenter.config.num_classes, (2, *rgb.shape[-2:]), generator=torch.Generator().manual_seed(seed))
    params = [p for p in segmenter.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)  # decay alone would move every weight
    segmenter.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(segmenter(rgb, aux), target)
        loss.backward()
        optimizer.step()
    return loss


@pytest.mark.parametrize("options", CONFIGS)
def test_gradients_reach_every_trainable_tensor_and_no_backbone_tensor(options):
    """Every adapter tensor gets a non-zero gradient, no backbone tensor gets one. The
    up-projections are moved off zero first: at init they block the gradient to everything
    before them (aux embedding, class tokens, prompter internals), by design."""
    model = make_backbone("vit", depth=4)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=4, hidden_dim=8, **options)
    trainable = {name for name, p in segmenter.named_parameters() if p.requires_grad}
    assert trainable and all(name.startswith("adapters.default.") for name in trainable)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for prompter in segmenter.adapter.prompters:
            prompter.up.weight.add_(torch.randn(prompter.up.weight.shape, generator=generator) * 0.05)
    segmenter.train()
    rgb, aux = family_inputs("vit")
    segmenter(rgb, aux).square().mean().backward()
    zero = [name for name in trainable if not segmenter.get_parameter(name).grad.abs().sum() > 0]
    assert zero == []
    assert all(p.grad is None for name, p in segmenter.named_parameters() if name not in trainable)
    assert all(p.grad is None for p in segmenter.backbone.parameters())


@pytest.mark.parametrize("options", CONFIGS)
def test_a_few_steps_move_every_adapter_tensor_and_no_backbone_tensor(options):
    model = make_backbone("vit", depth=4)
    backbone_before = snapshot(model)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=4, hidden_dim=8, **options)
    adapter_before = {name: p.detach().clone() for name, p in segmenter.adapter.named_parameters()}
    train_steps(segmenter)
    unmoved = [name for name, p in segmenter.adapter.named_parameters() if torch.equal(p, adapter_before[name])]
    assert unmoved == []
    assert_bitwise_equal(backbone_before, snapshot(segmenter.backbone))
    assert_bitwise_equal(backbone_before, snapshot(remove_gopt(segmenter)))


def test_backbone_stays_in_eval_mode_while_the_adapter_trains():
    model = make_backbone("vit")
    model.train()
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3)
    segmenter.train()
    assert segmenter.adapter.training and segmenter.adapter.head.bn.training
    assert not any(m.training for m in segmenter.backbone.modules())
    segmenter.eval()
    assert not any(m.training for m in segmenter.modules())


def test_frozen_backbone_ignores_dropout_during_training():
    """With drop rates set on the backbone, training-mode features at init still equal eval ones."""
    torch.manual_seed(0)
    import timm

    model = timm.create_model("vit_base_patch16_224", pretrained=False, embed_dim=32, depth=2, num_heads=2, img_size=64,
                              dynamic_img_size=True, drop_rate=0.5, attn_drop_rate=0.5, drop_path_rate=0.5)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=3, assignment="soft")
    rgb, aux = family_inputs("vit")
    with torch.no_grad():
        eval_features = segmenter.eval().features(rgb, aux)
        train_features = segmenter.train().features(rgb, aux)
    assert torch.equal(eval_features, train_features)


def test_evaluation_is_deterministic_and_training_noise_follows_the_seed():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=5, hidden_dim=8)
    perturb_adapter(segmenter, std=0.3)
    rgb, aux = family_inputs("vit")
    with torch.no_grad():
        segmenter.eval()
        torch.manual_seed(0)
        first = segmenter(rgb, aux)
        torch.manual_seed(1)
        assert torch.equal(first, segmenter(rgb, aux))
        segmenter.train()
        segmenter.adapter.head.bn.momentum = 0.0  # keep BN statistics fixed between the calls
        outputs = []
        for seed in (7, 7, 8):
            torch.manual_seed(seed)
            outputs.append(segmenter(rgb, aux))
    assert torch.equal(outputs[0], outputs[1])
    assert not torch.equal(outputs[0], outputs[2])


def test_grad_checkpointing_gives_the_same_gradients():
    segmenter = apply_gopt(make_backbone("vit", depth=3), aux_channels=1, num_classes=4, hidden_dim=8, assignment="soft")
    perturb_adapter(segmenter, std=0.1)
    segmenter.eval()  # no BN statistics update, no Gumbel noise
    rgb, aux = family_inputs("vit")

    def grads():
        segmenter.zero_grad()
        segmenter(rgb, aux).square().mean().backward()
        return [p.grad.clone() for p in segmenter.adapter.parameters()]

    plain = grads()
    segmenter.set_grad_checkpointing(True)
    checkpointed = grads()
    for a, b in zip(plain, checkpointed):
        torch.testing.assert_close(a, b)


def test_timm_grad_checkpointing_is_refused_with_guidance():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3)
    segmenter.backbone.set_grad_checkpointing(True)
    with pytest.raises(RuntimeError, match="set_grad_checkpointing"):
        segmenter(*family_inputs("vit"))


def test_deepcopy_keeps_blocks_and_context_together():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3, hidden_dim=8)
    perturb_adapter(segmenter)
    twin = copy.deepcopy(segmenter).eval()
    rgb, aux = family_inputs("vit")
    with torch.no_grad():
        assert torch.equal(twin(rgb, aux), segmenter.eval()(rgb, aux))
    assert twin.backbone.blocks[0].context is twin._context
