"""Inputs without flags: any patch size on any image size and a fixed image scale, from
``gopt train`` through the adapter file to ``gopt eval`` / ``gopt predict``."""

import numpy as np
import pytest
import torch

from gopt_adapter import apply_gopt, read_adapter_file, save_adapter
from gopt_adapter.backbone import BackboneSpec, create_backbone
from gopt_adapter.datasets import SyntheticRGBX
from gopt_adapter.engine import evaluate
from gopt_adapter.metrics import SegMetrics
from gopt_adapter.predict import ImagePair, predict_labels
from gopt_adapter.preprocessing import Preprocessing, dataset_preprocessing
from gopt_adapter.restore import restore_segmenter
from gopt_adapter.transforms import NormalizeConfig, build_transforms, default_train_config, resize_image

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


# ----------------------------------------------------------------------- image scale
class RgbConv(torch.nn.Conv2d):
    """A 1x1 conv on rgb, called as every segmenter is: ``model(rgb, aux)``."""

    def forward(self, rgb, aux):
        return super().forward(rgb)


def test_evaluation_scores_scaled_inputs_at_the_labels_resolution():
    """With image_scale 0.5 the model sees 16x16 inputs, the metrics count every 32x32 label pixel,
    and they equal the logits resized to the label by hand."""
    transforms = default_train_config("synthetic", image_scale=0.5)
    dataset = SyntheticRGBX("depth", length=3, size=32, seed=1, transform=build_transforms("synthetic", False, transforms))
    classes = len(dataset.class_names)
    torch.manual_seed(0)
    model = RgbConv(3, classes, 1)
    seen = []
    model.register_forward_hook(lambda module, args, out: seen.append(tuple(args[0].shape[-2:])))
    metrics = evaluate(model, dataset, classes)
    assert set(seen) == {(16, 16)}
    expected = SegMetrics(classes)
    with torch.no_grad():
        for sample in dataset:
            logits = model(sample["rgb"][None], None)
            logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
            expected.update(logits.argmax(1), sample["label"][None])
    reference = expected.compute()
    assert metrics["total"] == reference["total"] == int((torch.stack([s["label"] for s in dataset]) != 255).sum())
    assert metrics["miou"] == reference["miou"] and metrics["iou"] == reference["iou"]


def test_preprocessing_records_the_image_scale_the_transform_applies():
    transforms = default_train_config("synthetic", image_scale=0.5)
    dataset = SyntheticRGBX("depth", length=1, size=32, transform=build_transforms("synthetic", False, transforms))
    preprocessing = dataset_preprocessing(dataset)
    assert preprocessing.image_scale == 0.5 and preprocessing.to_dict()["image_scale"] == 0.5
    assert Preprocessing.from_dict(preprocessing.to_dict()) == preprocessing
    assert "inputs resized by 0.5" in preprocessing.describe()
    assert "image_scale" not in Preprocessing().to_dict()  # unscaled files stay as older versions wrote them
    for bad in (0, -1.0, float("nan"), float("inf"), True, "half"):
        with pytest.raises(ValueError, match="image_scale must be a finite number > 0"):
            Preprocessing(image_scale=bad)


def test_predict_resizes_inputs_and_writes_labels_at_full_size():
    segmenter = apply_gopt(build(), 1, 3, hidden_dim=8).eval()
    rng = np.random.default_rng(0)
    pair = ImagePair("x", rng.random((30, 44, 3), dtype=np.float32), rng.random((30, 44, 1), dtype=np.float32),
                     None, None, "auxiliary")
    norm = NormalizeConfig()
    label = predict_labels(segmenter, pair, norm, image_scale=0.5)
    assert label.shape == (30, 44)
    rgb = resize_image(torch.from_numpy(pair.rgb.transpose(2, 0, 1))[None], (15, 22), antialias=True)
    aux = resize_image(torch.from_numpy(pair.aux.transpose(2, 0, 1))[None], (15, 22), antialias=True)
    rgb = (rgb - torch.tensor(norm.rgb_mean).view(1, 3, 1, 1)) / torch.tensor(norm.rgb_std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = segmenter(rgb, (aux - 0.5) / 0.5)  # the padded backbone takes 15x22 as it is
    full = torch.nn.functional.interpolate(logits, size=(30, 44), mode="bilinear", align_corners=False)
    assert np.array_equal(label, full[0].argmax(0).numpy())
