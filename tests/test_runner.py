"""The benchmark runner end to end on the CPU: bad input, a short run, calibration, resume checks."""

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from benchmarks import run as runner
from gopt_adapter import read_adapter_file
from gopt_adapter.train import run as recipe
from gopt_adapter.train.metrics import SegMetrics
from model_helpers import nan_logits, with_logits
from gopt_adapter.cli.commands import build_train_parser
from gopt_adapter.train.run_config import config_path, load_run_config

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--dataset", "synthetic", "--device", "cpu", "--set", "train.progress=false", "--set", "train.log_every=1",
         "--set", "dataset_options.length=48", "--set", "val_options.length=8", "--set", "train.batch_size=8"]


def no_nan(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")


def read_json(path):
    return json.loads(Path(path).read_text(), parse_constant=no_nan)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "kitti"], "unknown dataset 'kitti'"),
        (["--dataset", "synthetic", "--variant", "gopt_xl"], "unknown variant 'gopt_xl'"),
        (["--dataset", "nyudv2"], "--root is required"),
        (["--dataset", "mfnet", "--root", "/nonexistent/MFNet"], "does not exist"),
        (["--dataset", "synthetic", "--weights", "/nonexistent/w.pth"], "weights file /nonexistent/w.pth not found"),
        (["--dataset", "synthetic", "--set", "train.epochs=0"], "epochs must be a positive integer"),
        (["--dataset", "synthetic", "--set", "trian.epochs=1"], "unknown settings ['trian']"),
        (["--dataset", "synthetic", "--set", "transforms.crop=64"], "unexpected keyword argument 'crop'"),
        (["--dataset", "synthetic", "--set", "transforms.crop_size=64"], "invalid transforms settings"),
        (["--dataset", "synthetic", "--set", "transforms.normalize=[0.5]"], "normalize must be an object"),
        (["--dataset", "synthetic", "--set", 'transforms.normalize={"aux_mean": [0.1, 0.2]}'],
         "aux has 1 channels but aux_mean/aux_std have 2/1 values"),
        (["--dataset", "synthetic", "--set", 'transforms.augment="no"'], "augment must be true or false"),
        (["--dataset", "synthetic", "--set", "train=5"], "setting train must be a JSON object"),
        (["--dataset", "synthetic", "--set", "train.epochs.x=1"], "'epochs' is 4, not a group of settings"),
        (["--dataset", "synthetic", "--set", "out=5"], "setting out must be a string"),
        (["--dataset", "synthetic", "--set", "dataset=nyudv2"], "choose the dataset with --dataset"),
        (["--dataset", "synthetic", "--set", "train.eval_window=16", "--set", "train.eval_stride=32"],
         "got eval_stride 32 with eval_window 16"),
        (["--dataset", "synthetic", "--set", "train.batch_size=1024"], "fewer than one batch of 1024"),
        (["--dataset", "synthetic", "--device", "tpu:x"], "unknown device 'tpu:x'"),
        (["--dataset", "nyudv2", "--root", "/"],  # no silent random backbone
         "choose the backbone's weights with exactly one of --weights FILE, --pretrained or --random-init"),
        (["--dataset", "synthetic", "--pretrained", "--random-init"], "(got --pretrained and --random-init)"),
        (["--dataset", "synthetic", "--set", "random_init=false"], "exactly one of --weights FILE"),
        (["--dataset", "synthetic", "--set", "random_init=1"], "setting random_init must be true or false"),
        (["--dataset", "synthetic", "--weights", __file__], "expected a .safetensors, .pth, .pt or .bin file"),
    ],
)
def test_bad_input_fails_before_any_work(args, message, tmp_path, capsys):
    out = tmp_path / "run"
    assert runner.main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one line, no traceback
    assert message in err
    assert not out.exists()


def test_weights_that_do_not_fit_the_backbone(tmp_path, capsys):
    weights = tmp_path / "other.safetensors"
    save_file({"pos_embed": torch.zeros(1, 5, 7)}, str(weights))
    assert runner.main([*SMALL, "--weights", str(weights), "--out", str(tmp_path / "run")]) == 2
    assert "do not fit backbone" in capsys.readouterr().err


def test_pth_weights_are_loaded_only_when_they_hold_nothing_but_tensors(tmp_path, capsys):
    """--weights FILE.pth goes through torch.load(weights_only=True) first: a pickle that would
    run code is refused (and its code never runs); a plain state dict trains."""
    marker = tmp_path / "code_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"pos_embed": Payload()}, tmp_path / "evil.pth")
    assert runner.main([*SMALL, "--weights", str(tmp_path / "evil.pth"), "--out", str(tmp_path / "evil")]) == 2
    err = capsys.readouterr().err
    assert "cannot be loaded safely" in err and err.count("\n") == 1 and not marker.exists()

    config = load_run_config(runner.parse_args(SMALL))
    torch.save(recipe.build_backbone(config).state_dict(), tmp_path / "good.pth")
    out = tmp_path / "good"
    assert runner.main([*SMALL, "--weights", str(tmp_path / "good.pth"), "--set", "train.epochs=1",
                        "--set", "dataset_options.length=16", "--set", "val_options.length=2", "--out", str(out)]) == 0
    record = read_json(out / "results.json")
    assert record["backbone_init"] == "weights" and record["config"]["random_init"] is False  # the flag replaced it


def test_short_run_writes_results_and_adapter(tmp_path, monkeypatch):
    from gopt_adapter.train import engine

    real_evaluate = engine.evaluate  # evaluate one class more than the model predicts: its IoU is NaN
    monkeypatch.setattr(engine, "evaluate", lambda model, data, k, *a, **kw: real_evaluate(model, data, k + 1, *a, **kw))
    out = tmp_path / "run"
    assert runner.main([*SMALL, "--variant", "gopt_shallow", "--set", "train.epochs=1", "--out", str(out)]) == 0
    record = read_json(out / "results.json")  # standard JSON: NaN is written as null
    assert record["metrics"]["iou"][-1] is None and record["metrics"]["acc"][-1] is None
    assert record["config"]["variant"] == "gopt_shallow" and record["world_size"] == 1
    assert 0 <= record["metrics"]["miou"] <= 1 and record["train_images_per_s"] > 0 and record["wall_time_s"] > 0
    assert record["epochs_completed"] == 1
    assert record["backbone_init"] == "random_init"  # the synthetic config trains from scratch, on purpose
    assert all(isinstance(r, dict) for r in map(lambda l: json.loads(l, parse_constant=no_nan),
                                                (out / "log.jsonl").read_text().splitlines()))
    adapter = read_adapter_file(out / "adapter.safetensors")
    assert record["trainable_parameters"] == sum(t.numel() for n, t in adapter.tensors.items()
                                                 if "running" not in n and "num_batches" not in n)
    assert adapter.preprocessing is not None and adapter.preprocessing.to_dict() == record["preprocessing"]
    assert record["missing_mode_calibration"] is None  # no aux-missing mode to calibrate


def test_a_run_with_aux_dropout_calibrates_and_saves_the_missing_mode(tmp_path, capsys):
    out = tmp_path / "run"
    assert runner.main([*SMALL, "--variant", "gopt_aux_dropout", "--set", "train.epochs=1", "--out", str(out)]) == 0
    assert "calibrated the aux-missing mode on" in capsys.readouterr().err
    calibration = read_json(out / "results.json")["missing_mode_calibration"]
    assert calibration["pixels"] > 0
    saved = read_adapter_file(out / "adapter.safetensors").tensors["missing_logit_bias"]
    assert saved.tolist() == pytest.approx(calibration["missing_logit_bias"]) and saved.abs().max() > 0


def favour_class_zero(logits):
    """Logits ``[B, K, H, W]`` with class 0 ahead by 1e4: argmax 0 everywhere, loss still finite."""
    bias = torch.zeros_like(logits)
    bias[:, 0] = 1e4
    return logits + bias


def test_a_model_that_predicts_one_class_is_warned_about(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "build_variant", with_logits(recipe.build_variant, favour_class_zero))
    out = tmp_path / "run"
    assert runner.main([*SMALL, "--set", "train.epochs=1", "--set", "dataset_options.length=16",
                        "--set", "val_options.length=2", "--out", str(out)]) == 0
    record = read_json(out / "results.json")
    assert record["metrics"]["predicted_classes"] == 1 and record["nonfinite_steps"] == 0
    assert record["metrics"]["predicted_pixels"][0] == record["metrics"]["total"] == 2 * 64 * 64
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: the trained model predicts only class 0 ('wall') on all 8,192 validation pixels; "
                        "check the labels and the class balance, or lower the learning rate"]


def test_the_single_class_warning_needs_one_predicted_class():
    metrics = SegMetrics(3)
    metrics.update(torch.tensor([2, 2, 2]), torch.tensor([0, 1, 2]))
    assert "only class 2 ('c')" in recipe.single_class_warning(metrics.compute(), ["a", "b", "c"])
    metrics.update(torch.tensor([0]), torch.tensor([0]))
    assert recipe.single_class_warning(metrics.compute(), ["a", "b", "c"]) is None
    assert recipe.single_class_warning({"miou": 0.5}, ["a"]) is None  # metrics of an older checkpoint


def test_a_diverging_run_ends_in_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(recipe, "build_variant", with_logits(recipe.build_variant, nan_logits))
    out = tmp_path / "run"
    assert runner.main([*SMALL, "--set", "train.max_nonfinite_steps=2", "--out", str(out)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: training stopped at step 2 (epoch 1): 2 optimizer steps in a row had a non-finite")
    assert sum(line.startswith("warning: step") for line in err) == 2
    assert not (out / "results.json").exists() and not (out / "adapter.safetensors").exists()


@pytest.mark.parametrize("variant", ["vpt_shallow", "fft", "fft_early", "probe"])
def test_baseline_run_keeps_its_trained_tensors(tmp_path, variant):
    """Baselines have no adapter file: their trainable tensors go to trained.safetensors."""
    out = tmp_path / variant
    assert runner.main([*SMALL, "--variant", variant, "--set", "train.epochs=1", "--out", str(out)]) == 0
    record = read_json(out / "results.json")
    trained = load_file(str(out / "trained.safetensors"))
    assert not (out / "adapter.safetensors").exists()
    assert record["trainable_parameters"] == sum(t.numel() for n, t in trained.items()
                                                 if "running" not in n and "num_batches" not in n)


def test_resume_with_other_settings_is_refused_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    args = [*SMALL, "--set", "train.epochs=1", "--set", "dataset_options.length=16", "--set", "val_options.length=2",
            "--out", str(out)]
    assert runner.main(args) == 0
    capsys.readouterr()
    assert runner.main([*args, "--resume", "--set", "train.lr=0.5", "--set", "train.seed=3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert "lr 0.001 -> 0.5" in err and "seed 0 -> 3" in err
    assert runner.main([*args, "--resume", "--variant", "gopt_shallow"]) == 2
    assert "does not fit this model" in capsys.readouterr().err
    assert runner.main([*args, "--resume", "--set", "train.log_every=5"]) == 0  # logging only: accepted


def write_result(folder, dataset, variant, metrics, backbone="vit_base_patch16_224.mae", class_names=None,
                 params=937224):
    from benchmarks import suite

    folder.mkdir(parents=True)
    names = list(class_names or suite.FULL_CLASSES.get(dataset, ("a", "b")))
    record = {"config": {"dataset": dataset, "variant": variant, "backbone": backbone, "backbone_kwargs": {}},
              "class_names": names, "trainable_parameters": params, "metrics": metrics}
    (folder / "results.json").write_text(json.dumps(record))


def table_section(text, title, backbone="vit_base_patch16_224.mae"):
    start = text.index(f"### {title}: backbone {backbone}\n")
    end = text.find("### ", start + 4)
    return text[start:end if end >= 0 else None]


def row(section, label):
    return next(line for line in section.splitlines() if line.startswith(f"| {label} |"))


def test_suite_puts_our_runs_beside_the_papers_numbers(tmp_path):
    from benchmarks import suite

    for seed, miou in ((0, 0.50), (1, 0.52)):
        write_result(tmp_path / f"nyu_gopt_{seed}", "nyudv2", "gopt", {"pixel_acc": 0.8, "mean_acc": 0.6, "miou": miou})
    text = suite.render(suite.collect(tmp_path))
    table4 = table_section(text, "Table 4: variants and ablations")
    assert "| nyudv2 PAcc (40 classes) |" in table4
    assert "| 0.94M | 80.0±0.0 (79.8, +0.2) | 60.0±0.0 (67.5, -7.5) | 51.0±1.4 (54.1, -3.1) | - (77.1) |" in row(
        table4, "GoPT (ACP query ours: RGB + aux token)")
    assert row(table4, "GoPT (ACP query as printed: RGB token)").startswith("| GoPT (ACP query as printed: RGB token) | - |")
    assert text.startswith(suite.QUERY_NOTE) and "`gopt_rgb_query`" in suite.QUERY_NOTE
    assert row(table4, "FFT (two streams, CEN exchange)").endswith("| - (78.5) | - (65.4) | - (53.1) | - (74.9) | "
                                                                   "- (56.3) | - (70.8) | - (68.3) | - (58.9) |")
    assert row(table4, "FFT-early (one stream, not in paper)").endswith("| - | - |")
    assert "Fig. 6" not in text and "Fig. 7" not in text  # no such runs


def test_suite_keeps_backbones_and_class_settings_apart(tmp_path):
    from benchmarks import suite

    full, no_bg = suite.WHU_OPT_SAR_CLASSES, [n for n in suite.WHU_OPT_SAR_CLASSES if n not in ("background", "others")]
    write_result(tmp_path / "b_all", "whu_opt_sar", "gopt", {"oa": 0.70, "aa": 0.60, "kappa": 0.50}, class_names=full)
    write_result(tmp_path / "b_six", "whu_opt_sar", "gopt", {"oa": 0.80, "aa": 0.70, "kappa": 0.60}, class_names=no_bg)
    write_result(tmp_path / "large", "whu_opt_sar", "gopt", {"oa": 0.90, "aa": 0.80, "kappa": None},
                 backbone="vit_large_patch16_224.mae", class_names=full, params=2_000_000)
    runs = suite.collect(tmp_path)
    assert len(runs) == 3  # nothing averaged across settings
    text = suite.render(runs)
    base = table_section(text, "Table 3: RGB-SAR (WHU-OPT-SAR)")
    header = row(base, "method")
    assert "whu_opt_sar OA (6 classes, without background, others)" in header
    assert "whu_opt_sar OA (8 classes)" in header
    gopt = row(base, "GoPT (B)")
    assert "70.0 (72.9, -2.9)" in gopt and "80.0 (72.9, +7.1)" in gopt
    large = table_section(text, "Table 3: RGB-SAR (WHU-OPT-SAR)", "vit_large_patch16_224.mae")
    assert "the paper's are for ViT-B" in large
    assert row(large, "GoPT (B)") == "| GoPT (B) | 2.00M | 90.0 | 80.0 | n/a |"  # null kappa, no paper gap


def test_suite_adds_the_interval_and_assignment_figures_when_they_have_runs(tmp_path):
    from benchmarks import suite

    for variant, miou in (("gopt", 0.50), ("gopt_i2", 0.48), ("gopt_i12", 0.40), ("gopt_shallow", 0.42),
                          ("gopt_soft", 0.47)):
        write_result(tmp_path / variant, "nyudv2", variant, {"pixel_acc": 0.8, "mean_acc": 0.6, "miou": miou})
    text = suite.render(suite.collect(tmp_path))
    fig6 = table_section(text, "Fig. 6: a grouping prompter every N blocks")
    assert "| method | params | nyudv2 PAcc (40 classes) | nyudv2 mAcc (40 classes) | nyudv2 mIoU (40 classes) |" in fig6
    assert row(fig6, "every 1 block").endswith("| 50.0 |")  # gopt is gopt_i1
    assert row(fig6, "every 2 blocks").endswith("| 48.0 |")
    assert row(fig6, "every 4 blocks").endswith("| - |")
    assert row(fig6, "every 12 blocks").endswith("| 41.0±1.4 |")  # gopt_i12 pooled with gopt_shallow
    fig7 = table_section(text, "Fig. 7: hard vs soft group assignment")
    assert row(fig7, "hard (gopt)").endswith("| 50.0 |") and row(fig7, "soft (gopt_soft)").endswith("| 47.0 |")


def test_suite_names_a_file_that_is_not_a_run_record(tmp_path, capsys):
    from benchmarks import suite

    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "results.json").write_text(json.dumps({"config": {"dataset": "nyudv2", "variant": "gopt"}}))
    assert suite.main(["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "x/results.json: not a benchmarks.run record" in err


def test_vit_large_backbone_builds_through_the_runner():
    """The ViT-L path of the docs (MAE ViT-L/16), cut to one block: no weights here."""
    from gopt_adapter import count_parameters
    from gopt_adapter.baselines import build_variant

    config = load_run_config(runner.parse_args(
        ["--dataset", "synthetic", "--backbone", "vit_large_patch16_224.mae", "--set", 'backbone_kwargs={"depth": 1}']))
    backbone = recipe.build_backbone(config)
    assert backbone.embed_dim == 1024 and len(backbone.blocks) == 1
    model = build_variant("gopt", backbone, 1, 4)
    rgb = torch.randn(1, 3, 32, 48)
    with torch.no_grad():
        assert model(rgb, torch.randn(1, 1, 32, 48)).shape == (1, 4, 32, 48)
    assert 0 < count_parameters(model).trainable < 2_000_000


TINY_BACKBONE = ["--backbone", "vit_base_patch16_224", "--set",
                 'backbone_kwargs={"embed_dim": 32, "depth": 2, "num_heads": 2, "patch_size": 8, "img_size": 32, '
                 '"dynamic_img_pad": true}',
                 "--set", "transforms.crop_size=[16, 24]", "--set", "train.epochs=1", "--set", "train.batch_size=2",
                 "--set", "train.progress=false", "--device", "cpu", "--random-init"]


def make_layout(dataset, root):
    import datasets_helpers as helpers

    splits = {"train": ["a", "b", "c", "d"], "test": ["e", "f"]}
    if dataset in ("nyudv2", "sunrgbd"):
        helpers.make_nyudv2(root, splits, h=20, w=28, **({} if dataset == "nyudv2" else
                                                        {"label_folder": "labels", "num_classes": 37}))
    elif dataset == "mfnet":
        helpers.make_mfnet(root, {**splits, "val": ["g"]}, h=20, w=28)
    elif dataset == "pst900":
        helpers.make_pst900(root, splits, h=20, w=28)
    else:
        from gopt_adapter.data import tile_whu_opt_sar

        helpers.make_whu_scenes(root / "scenes", [f"s{i}" for i in range(5)], h=40, w=56)
        tile_whu_opt_sar(root / "scenes", root / "tiles", tile_size=16, progress=False)
        return root / "tiles"
    return root


@pytest.mark.parametrize("dataset", ["nyudv2", "sunrgbd", "mfnet", "pst900", "whu_opt_sar"])
def test_runner_on_tiny_copies_of_each_layout(dataset, tmp_path):
    root = make_layout(dataset, tmp_path / "data")
    out = tmp_path / "run"
    assert runner.main(["--dataset", dataset, "--root", str(root), "--variant", "gopt", "--out", str(out),
                        *TINY_BACKBONE]) == 0
    record = json.loads((out / "results.json").read_text())
    assert record["config"]["dataset"] == dataset and 0 <= record["metrics"]["miou"] <= 1
    assert (out / "adapter.safetensors").exists()


def test_the_configs_augment_and_one_setting_turns_it_off():
    """Every packaged config states the augmentation reading (on: crop and flip are standard);
    ``--set transforms.augment=false`` leaves only the centred crop."""
    from gopt_adapter.train import run as recipe
    from gopt_adapter.data.transforms import build_transforms

    for path in sorted(config_path("synthetic").parent.glob("*.json")):
        assert read_json(path)["transforms"]["augment"] is True, path.name
    for setting, expected in (([], ["RandomScale", "RandomCrop", "RandomHorizontalFlip", "Normalize"]),
                              (["--set", "transforms.augment=false"], ["CenterCrop", "Normalize"])):
        config = load_run_config(build_train_parser().parse_args(["--dataset", "synthetic", *setting]))
        transforms = recipe.build_transform_config(config)
        assert transforms.crop_size == (64, 64)
        assert [type(t).__name__ for t in build_transforms("synthetic", True, transforms).transforms] == expected


def test_a_settings_file_chooses_the_variant_unless_the_flag_does(tmp_path):
    """``gopt train --config field_probe.json`` trains the file's variant; ``--variant`` overrides it."""
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"variant": "probe", "train": {"epochs": 1}}))
    base = ["--dataset", "synthetic", "--config", str(settings), "--random-init"]
    assert load_run_config(build_train_parser().parse_args(base)).variant == "probe"
    assert load_run_config(build_train_parser().parse_args([*base, "--variant", "vpt_deep"])).variant == "vpt_deep"
    settings.write_text(json.dumps({"train": {"epochs": 1}}))
    assert load_run_config(build_train_parser().parse_args(base)).variant == "gopt"
