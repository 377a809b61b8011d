"""The aux-missing mode: ``segmenter(rgb, aux=None)``, per-sample masks, ``aux_dropout`` training,
and what it does to adapter files. The reference for a masked batch is each sample alone."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, safe_open

import gopt_adapter.adapter_file as adapter_io
from model_helpers import assert_bitwise_equal, family_inputs, make_backbone, perturb_adapter, snapshot
from gopt_adapter import GoptConfig, apply_gopt, load_adapter, read_adapter_file, save_adapter
from gopt_adapter.adapter import GoptAdapter
from gopt_adapter.baselines import build_variant
from gopt_adapter.prompter import PromptState
from test_training import train_steps

DROPOUT = dict(aux_channels=1, num_classes=5, aux_dropout=0.3)


def trained_segmenter(options=DROPOUT, family="vit", seed=0):
    """An eval-mode segmenter whose adapter, missing-aux token included, looks trained."""
    segmenter = apply_gopt(make_backbone(family, depth=2, seed=seed), **options)
    perturb_adapter(segmenter, std=0.2, seed=seed)
    return segmenter.eval()


def test_aux_none_equals_an_all_missing_mask_and_differs_from_clean_aux():
    segmenter = trained_segmenter()
    rgb, aux = family_inputs("vit", batch=3)
    with torch.no_grad():
        without = segmenter(rgb, None)
        masked = segmenter(rgb, aux, torch.ones(3, dtype=torch.bool))
        clean = segmenter(rgb, aux)
    assert torch.equal(without, masked)
    assert (without - clean).abs().max() > 1e-3  # the aux image matters when present


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mask=st.lists(st.booleans(), min_size=1, max_size=4), family=st.sampled_from(["vit", "deit_distilled"]))
def test_a_mixed_batch_equals_each_sample_alone(mask, family):
    """Present and missing samples in one batch: sample i gets what it gets alone, with its own
    aux image or with ``aux=None``. NaN in an absent sample's aux is never read."""
    segmenter = trained_segmenter(family=family)
    rgb, aux = family_inputs(family, batch=len(mask))
    missing = torch.tensor(mask)
    aux = aux.masked_fill(missing.view(-1, 1, 1, 1), float("nan"))
    with torch.no_grad():
        batch = segmenter(rgb, aux, missing)
        for i, absent in enumerate(mask):
            alone = segmenter(rgb[i:i + 1], None if absent else aux[i:i + 1])
            torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)
            assert torch.equal(batch[i:i + 1].argmax(1), alone.argmax(1))
    assert torch.isfinite(batch).all()


def test_missing_samples_get_stand_in_tokens_made_from_their_rgb():
    """A missing sample's aux tokens are ``missing_aux`` + the scene-normalised patch conv of its
    RGB, computed here from the parameters; a present sample keeps its embedded aux."""
    segmenter = trained_segmenter()
    adapter = segmenter.adapter
    rgb, aux = family_inputs("vit", batch=2)
    embed = adapter.missing_embed
    with torch.no_grad():
        state = adapter.initial_state(aux, torch.tensor([True, False]), rgb)
        patches = F.conv2d(rgb[:1], embed.proj.weight, embed.proj.bias, stride=embed.patch_size)  # [1, r, h, w]
        tokens = patches.flatten(2).transpose(1, 2)  # [1, S, r]
        tokens = tokens - tokens.mean(dim=1, keepdim=True)  # each feature centred over the image
        tokens = tokens / (tokens.pow(2).mean() + 1e-6).sqrt()  # RMS 1
        expected = tokens * embed.norm.weight + embed.norm.bias + adapter.missing_aux
        torch.testing.assert_close(state.aux_tokens[:1], expected)
        assert torch.equal(state.aux_tokens[1], adapter.aux_embed(aux[1:])[0])
        assert state.aux_tokens[0].std(dim=0).min() > 0  # the stand-ins vary over the image
    with pytest.raises(ValueError, match="needs the rgb image"):
        adapter.initial_state(aux, torch.tensor([True, False]))


def test_aux_dropout_drops_the_configured_share_of_training_samples():
    """In training, each sample's aux is dropped with probability ``aux_dropout`` (binomial bound),
    in eval mode never."""
    segmenter = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=3, aux_dropout=0.3)
    adapter = segmenter.adapter
    with torch.no_grad():
        adapter.missing_aux.fill_(123.0)  # a value no embedded aux token takes
        adapter.missing_embed.norm.weight.zero_()  # stand-ins: exactly the token
    aux = torch.randn(2000, 1, 16, 16)
    rgb = torch.randn(2000, 3, 16, 16)
    torch.manual_seed(0)

    def dropped(state: PromptState) -> torch.Tensor:
        return (state.aux_tokens == 123.0).all(dim=2).all(dim=1)

    adapter.train()
    share = dropped(adapter.initial_state(aux, None, rgb)).float().mean().item()
    assert abs(share - 0.3) < 4 * (0.3 * 0.7 / 2000) ** 0.5  # four standard deviations
    adapter.eval()
    assert not dropped(adapter.initial_state(aux, None, rgb)).any()


def test_training_with_aux_dropout_moves_the_missing_token():
    segmenter = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=4, hidden_dim=8,
                           aux_dropout=0.5)
    perturb_adapter(segmenter)  # up-projections off zero, or no gradient reaches the prompters
    names = ("missing_aux", "missing_embed.proj.weight", "missing_embed.norm.weight")
    before = {name: segmenter.adapter.get_parameter(name).detach().clone() for name in names}
    torch.manual_seed(0)
    train_steps(segmenter, steps=3)
    for name in names:
        assert not torch.equal(before[name], segmenter.adapter.get_parameter(name)), name


def test_aux_dropout_zero_trains_exactly_as_without_the_option(monkeypatch):
    """With ``aux_dropout=0`` the adapter has the same tensors as before the option existed and
    training draws nothing extra: it gives bitwise the adapter that the original
    ``initial_state`` (embed the aux, expand the class tokens) gives."""
    def original_initial_state(self, aux):
        return PromptState(self.aux_embed(aux), self.class_tokens.unsqueeze(0).expand(aux.shape[0], -1, -1))

    def train(seed=0):
        torch.manual_seed(seed)
        segmenter = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=4, hidden_dim=8)
        perturb_adapter(segmenter)
        train_steps(segmenter, steps=3)
        return segmenter

    ours = train()
    assert "missing_aux" not in dict(ours.adapter.named_parameters())
    with monkeypatch.context() as patch:
        patch.setattr(GoptAdapter, "initial_state", original_initial_state)
        reference = train()
    assert_bitwise_equal(snapshot(reference.adapter), snapshot(ours.adapter))
    assert list(ours.adapter.state_dict()) == list(reference.adapter.state_dict())


def test_the_missing_token_is_saved_and_loaded_with_the_adapter(tmp_path):
    segmenter = trained_segmenter()
    path = save_adapter(segmenter, tmp_path / "a.safetensors")
    assert {"missing_aux", "missing_embed.proj.weight"} <= set(read_adapter_file(path).tensors)
    fresh = apply_gopt(make_backbone("vit", depth=2), **DROPOUT).eval()
    load_adapter(fresh, path)
    rgb, _ = family_inputs("vit", batch=2)
    with torch.no_grad():
        assert torch.equal(fresh(rgb, None), segmenter(rgb, None))


def test_adapter_files_from_before_the_option_load_and_refuse_only_aux_none(tmp_path):
    """A file whose config has no ``aux_dropout`` (as every earlier file) loads and runs with aux;
    ``aux=None`` then raises one clear error naming the adapter."""
    segmenter = trained_segmenter(dict(aux_channels=1, num_classes=5))
    path = save_adapter(segmenter, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as handle:
        metadata = dict(handle.metadata())
    config = json.loads(metadata["config"])
    del config["aux_dropout"]
    old = tmp_path / "old.safetensors"
    old.write_bytes(adapter_io.seal(load_file(str(path)), {**metadata, "config": json.dumps(config)}))
    fresh = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=5).eval()
    fresh.add_adapter("old", old)
    fresh.set_adapter("old")
    rgb, aux = family_inputs("vit", batch=1)
    with torch.no_grad():
        assert torch.equal(fresh(rgb, aux), segmenter(rgb, aux))
        with pytest.raises(ValueError, match="adapter 'old' has no aux-missing mode.*aux_dropout"):
            fresh(rgb, None)
        with pytest.raises(ValueError, match="no aux-missing mode"):
            fresh(rgb, aux, torch.tensor([False]))


@pytest.mark.parametrize("variant", ["vpt_deep", "foundation"])
def test_baselines_have_no_missing_mode(variant):
    model = build_variant(variant, make_backbone("vit", depth=2), 1, 3).eval()
    rgb, _ = family_inputs("vit", batch=1)
    with pytest.raises(ValueError, match="no aux-missing mode"):
        model(rgb, None)


@pytest.mark.parametrize("mask, message", [
    (torch.tensor([1, 0]), "bool tensor"),
    (torch.tensor([True]), r"\[B\] = \[2\]"),
    ([True, False], "bool tensor"),
])
def test_bad_masks_are_named(mask, message):
    segmenter = trained_segmenter()
    rgb, aux = family_inputs("vit", batch=2)
    with pytest.raises(ValueError, match=message):
        segmenter(rgb, aux, mask)
    with pytest.raises(ValueError, match="needs an aux tensor"):
        segmenter(rgb, None, torch.tensor([True, True]))


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, True, "0.2", float("nan")])
def test_aux_dropout_must_be_a_probability(value):
    with pytest.raises(ValueError, match="aux_dropout must be a probability"):
        GoptConfig(aux_channels=1, num_classes=2, aux_dropout=value)


def test_the_missing_mode_costs_a_token_and_an_rgb_patch_embedding():
    """``r`` for the token, ``3 * p * p * r + r`` for the RGB patch conv, ``2 r`` for its LayerNorm."""
    plain = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=3)
    robust = apply_gopt(make_backbone("vit", depth=2), aux_channels=1, num_classes=3, aux_dropout=0.2)
    count = lambda s: sum(p.numel() for p in s.adapter.parameters())  # noqa: E731
    r, (ph, pw) = robust.config.hidden_dim, robust.spec.patch_size
    assert count(robust) - count(plain) == r + (3 * ph * pw * r + r) + 2 * r
