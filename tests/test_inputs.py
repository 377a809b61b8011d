"""Inputs without flags: any patch size on any image size, from ``gopt train`` through the
adapter file to ``gopt eval`` / ``gopt predict``."""

import pytest
import torch

from gopt_adapter import apply_gopt, read_adapter_file, save_adapter
from gopt_adapter.backbone import BackboneSpec, create_backbone
from gopt_adapter.restore import restore_segmenter

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

NAME = "vit_base_patch16_224"
PATCH7 = dict(embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=56)


def features(model, rgb):
    return model.forward_intermediates(rgb, indices=1, norm=True, output_fmt="NCHW", intermediates_only=True)[-1]


def build(name=NAME, kwargs=PATCH7, pad_images=True, seed=0):
    torch.manual_seed(seed)
    return create_backbone(name, None, kwargs, pad_images=pad_images)


# ----------------------------------------------------------------------- any patch size
def test_pad_images_pads_where_needed_and_changes_nothing_where_not():
    """A patch-7 ViT built with pad_images takes 50x61 (timm pads bottom/right); at a multiple of
    the patch it gives bit-identical features to the model built without it; the origin records
    the option so a rebuild pads too."""
    padded, plain = build(), build(pad_images=False)
    assert BackboneSpec.from_model(padded).dynamic_img_pad and not BackboneSpec.from_model(plain).dynamic_img_pad
    assert padded.gopt_origin["kwargs"] == {**PATCH7, "dynamic_img_pad": True}
    assert plain.gopt_origin["kwargs"] == PATCH7
    rgb = torch.randn(2, 3, 56, 63, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(features(padded, rgb), features(plain, rgb))
        assert features(padded, rgb[..., :50, :61]).shape == (2, 32, 8, 9)


def test_pad_images_respects_the_user_and_models_without_the_option():
    assert not BackboneSpec.from_model(build(kwargs={**PATCH7, "dynamic_img_pad": False})).dynamic_img_pad
    beit = build("beit_base_patch16_224", dict(embed_dim=32, depth=1, num_heads=2, img_size=64))  # no such option
    assert not BackboneSpec.from_model(beit).dynamic_img_pad and "dynamic_img_pad" not in beit.gopt_origin["kwargs"]


def test_a_padded_backbone_round_trips_through_the_adapter_file(tmp_path):
    segmenter = apply_gopt(build(), 1, 3, hidden_dim=8)
    path = save_adapter(segmenter, tmp_path / "a.safetensors")
    assert read_adapter_file(path).backbone_kwargs == {**PATCH7, "dynamic_img_pad": True}
    restored, _ = restore_segmenter(path, seed=0)  # rebuilt from the file: same seed, same random weights
    rgb, aux = torch.randn(1, 3, 50, 61), torch.randn(1, 1, 50, 61)
    with torch.no_grad():
        assert torch.equal(restored(rgb, aux), segmenter.eval()(rgb, aux))
