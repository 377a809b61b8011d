"""Inputs without flags: any patch size on any image size, the backbone's own mean/std, and a
fixed image scale, from ``gopt train`` through the adapter file to ``gopt eval`` / ``gopt predict``."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from gopt_adapter import apply_gopt, read_adapter_file, save_adapter
from gopt_adapter.backbone import BackboneSpec, create_backbone
from gopt_adapter.cli.commands import main
from gopt_adapter.data import SyntheticRGBX
from gopt_adapter.train.engine import evaluate
from gopt_adapter.train.metrics import SegMetrics
from gopt_adapter.cli.predict import ImagePair, predict_labels
from gopt_adapter.preprocessing import Preprocessing, dataset_preprocessing
from gopt_adapter.gopt_segmenter import restore_segmenter
from gopt_adapter.train import run as recipe
from gopt_adapter.preprocessing import NormalizeConfig
from gopt_adapter.data.transforms import build_transforms, default_train_config
from gopt_adapter.resize import resize_image
from gopt_adapter.cli.commands import build_train_parser
from gopt_adapter.train.run_config import load_run_config

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

NAME = "vit_base_patch16_224"  # timm's default tag is augreg: pretrained_cfg mean/std 0.5, not ImageNet's
PATCH7 = dict(embed_dim=32, depth=2, num_heads=2, patch_size=7, img_size=56)
HALF = (0.5, 0.5, 0.5)


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


# ----------------------------------------------------------------------- the backbone's mean/std
def run_config(*extra, weights=None):
    init = ["--weights", str(weights)] if weights else []
    return load_run_config(build_train_parser().parse_args(
        ["--dataset", "synthetic", "--backbone", NAME, "--set", f"backbone_kwargs={json.dumps(PATCH7)}",
         "--set", "dataset_options.length=2", "--set", "dataset_options.size=32", "--set", "val_options.length=2",
         *init, *extra]))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A patch-7 tiny ViT's weights: loading them keeps NAME's pretrained_cfg (mean/std 0.5)."""
    path = tmp_path_factory.mktemp("weights") / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in build(pad_images=False).state_dict().items()}, str(path))
    return path


def used_normalize(config):
    """What ``run`` builds: the backbone, its defaults, the datasets; and what it would record."""
    defaults = recipe.backbone_transform_defaults(config, recipe.build_backbone(config))
    _, val_set = recipe.build_datasets(config, defaults)
    return recipe.build_transform_config(config, None, defaults).normalize, dataset_preprocessing(val_set).normalize


def test_the_backbones_mean_and_std_are_the_default_and_the_user_wins(weights):
    used, recorded = used_normalize(run_config(weights=weights))
    assert (used.rgb_mean, used.rgb_std) == (HALF, HALF) and recorded == used
    used, recorded = used_normalize(run_config("--set", "transforms.normalize.rgb_mean=[0.4, 0.4, 0.4]",
                                               weights=weights))
    assert (used.rgb_mean, used.rgb_std) == ((0.4, 0.4, 0.4), HALF) and recorded == used  # key by key
    used, _ = used_normalize(run_config())  # --random-init (the synthetic config): pretrained on nothing
    assert used == NormalizeConfig()


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


# ----------------------------------------------------------------------- gopt train -> eval -> predict
def test_train_eval_predict_with_patch_7_the_backbones_mean_and_half_size(weights, tmp_path, capsys):
    """No flag for the patch size: the run pads (and says so), normalises with the backbone's
    mean/std (and says so), trains at half size and scores at full size; gopt eval rebuilds the
    same backbone and inputs from the adapter file and repeats the metrics; gopt predict writes
    labels at the input's full size."""
    out = tmp_path / "run"
    data = ["--set", "dataset_options.length=8", "--set", "dataset_options.size=32", "--set", "val_options.length=2"]
    assert main(["train", "--dataset", "synthetic", "--backbone", NAME, "--weights", str(weights), "--device", "cpu",
                 "--set", f"backbone_kwargs={json.dumps(PATCH7)}", "--set", "transforms.image_scale=0.5",
                 "--set", "transforms.crop_size=[16, 16]", "--set", "train.epochs=1", "--set", "train.batch_size=4",
                 "--set", "train.progress=false", *data, "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert (f"backbone {NAME}: patch 7 does not divide the 16x16 training crop; padding bottom/right as timm's "
            "dynamic_img_pad") in err
    assert f"backbone {NAME}: rgb_mean {HALF}, rgb_std {HALF} from its pretrained_cfg" in err
    record = json.loads((out / "results.json").read_text())
    assert record["preprocessing"]["normalize"]["rgb_mean"] == list(HALF)
    assert record["preprocessing"]["image_scale"] == 0.5
    assert record["metrics"]["total"] == 2 * 32 * 32  # every full-resolution label pixel of the 2 val images
    file = read_adapter_file(out / "adapter.safetensors")
    assert file.backbone_kwargs == {**PATCH7, "dynamic_img_pad": True}
    assert file.preprocessing.to_dict() == record["preprocessing"]

    assert main(["eval", "--dataset", "synthetic", "--adapter", str(out / "adapter.safetensors"), "--weights",
                 str(weights), "--device", "cpu", "--no-progress", *data]) == 0
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert metrics["miou"] == pytest.approx(record["metrics"]["miou"], abs=1e-12)

    image = tmp_path / "frame.png"  # RGB + one aux channel in one PNG, as MFNet stores them
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 44, 4), dtype=np.uint8)).save(image)
    assert main(["predict", "--adapter", str(out / "adapter.safetensors"), "--weights", str(weights),
                 "--no-progress", str(image), "-o", str(tmp_path / "pred")]) == 0
    assert "inputs resized by 0.5" in capsys.readouterr().err
    with Image.open(tmp_path / "pred" / "frame_label.png") as label:
        assert label.size == (44, 30)
