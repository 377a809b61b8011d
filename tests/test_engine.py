"""Training engine: schedule, state, evaluation, exact and checked resume, DDP details."""

import json
import math
import os
import socket

import pytest
import torch

from gopt_adapter import apply_gopt
from gopt_adapter.data import get_dataset
from gopt_adapter.train.engine import (
    CHECKPOINT_NAME,
    LOG_NAME,
    Dist,
    TrainConfig,
    Trainer,
    evaluate,
    init_distributed,
    json_line,
    json_safe,
    poly_lr_factor,
    shutdown_distributed,
    trainable_state_dict,
)
from gopt_adapter.errors import CheckpointError, NonFiniteError
from gopt_adapter.train.metrics import SegMetrics
from gopt_adapter.data.transforms import build_transforms, default_train_config
from model_helpers import PixelModel, make_backbone, perturb_adapter


def no_nan(constant):
    raise AssertionError(f"non-standard JSON constant {constant}")


def read_log(path):
    return [json.loads(line, parse_constant=no_nan) for line in path.read_text().splitlines()]


def test_poly_schedule_with_warmup():
    assert poly_lr_factor(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert poly_lr_factor(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert poly_lr_factor(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert poly_lr_factor(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert poly_lr_factor(55, 100, 10, 0.9) == pytest.approx(0.5 ** 0.9)
    assert poly_lr_factor(100, 100, 10, 1.0) == 0.0


@pytest.mark.parametrize("bad, message", [
    (dict(epochs=0), "epochs"), (dict(lr=-1.0), "lr"), (dict(batch_size=6, grad_accum=4), "grad_accum"),
    (dict(clip_grad_norm=0.0), "clip_grad_norm"), (dict(eval_stride=8), "eval_stride (8) needs eval_window"),
    (dict(eval_window=0), "eval_window must be a positive integer, got 0"),
    (dict(eval_window=16, eval_stride=0), "got eval_stride 0 with eval_window 16"),
    (dict(eval_window=16, eval_stride=17), "got eval_stride 17 with eval_window 16"),
    (dict(eval_window=16, eval_stride=-4), "got eval_stride -4 with eval_window 16"),
])
def test_train_config_validation(bad, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        TrainConfig(**bad)


def test_trainable_state_is_the_adapter_with_its_batchnorm_buffers():
    segmenter = apply_gopt(make_backbone("vit"), aux_channels=1, num_classes=3)
    state = trainable_state_dict(segmenter)
    expected = {f"adapters.default.{k}" for k in segmenter.adapter.state_dict()}
    assert set(state) == expected


def synthetic_sets(length=32):
    transforms = default_train_config("synthetic", crop_size=(32, 32))
    train = get_dataset("synthetic", split="train", mode="depth", size=32, length=length, seed=0,
                        transform=build_transforms("synthetic", True, transforms))
    val = get_dataset("synthetic", split="val", mode="depth", size=32, length=8, seed=0,
                      transform=build_transforms("synthetic", False))
    return train, val


def make_trainer(out, epochs=3, extra_classes=0, **overrides):
    """A tiny GoPT trainer; ``extra_classes`` evaluates classes the model never predicts (NaN IoU)."""
    train, val = synthetic_sets()
    model = apply_gopt(make_backbone("vit", depth=2), aux_channels=train.aux_channels,
                       num_classes=len(train.class_names), hidden_dim=8, head_channels=16)
    config = TrainConfig(**{**dict(epochs=epochs, batch_size=8, lr=1e-2, warmup_steps=2, log_every=1, progress=False,
                                   clip_grad_norm=1.0, grad_accum=2), **overrides})
    return Trainer(model, train, len(train.class_names) + extra_classes, config, out, val_set=val, device="cpu",
                   ctx=Dist())


def test_evaluation_leaves_the_training_rngs_alone():
    model = PixelModel()
    _, val = synthetic_sets()
    before = torch.get_rng_state()
    evaluate(model, val, 3)
    assert torch.equal(torch.get_rng_state(), before)


def test_training_logs_checkpoints_and_learns(tmp_path):
    trainer = make_trainer(tmp_path, extra_classes=1)
    metrics = trainer.fit()
    records = read_log(tmp_path / LOG_NAME)  # standard JSON: the never-seen class is null, not NaN
    steps = [r for r in records if r["event"] == "train"]
    assert [r["step"] for r in steps] == list(range(1, 3 * trainer.steps_per_epoch + 1))
    assert all(r["lr"] > 0 and r["images_per_s"] > 0 for r in steps)
    assert [r["epoch"] for r in records if r["event"] == "eval"] == [1, 2, 3]
    assert (tmp_path / CHECKPOINT_NAME).exists()
    assert 0 <= metrics["miou"] <= 1 and math.isnan(metrics["iou"][-1])  # in memory: still NaN
    first, last = (sum(r["loss"] for r in steps if r["epoch"] == e) for e in (1, 3))
    assert last < first


def test_json_safe_writes_null_for_non_finite_values():
    record = {"iou": [0.5, float("nan")], "kappa": float("inf"), "pair": (1, float("-inf")), "n": 3}
    assert json_safe(record) == {"iou": [0.5, None], "kappa": None, "pair": [1, None], "n": 3}
    assert json.loads(json_line(record), parse_constant=no_nan)["iou"] == [0.5, None]


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit()
    make_trainer(tmp_path / "b").fit(until_epoch=1)  # as if killed after the first epoch
    resumed = make_trainer(tmp_path / "b")
    perturb_adapter(resumed.model)  # the checkpoint must overwrite every adapter tensor
    resumed.fit(resume=True)
    assert resumed.step == straight.step
    a, b = straight.model.adapter.state_dict(), resumed.model.adapter.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics == straight.metrics
    assert resumed.train_images == straight.train_images  # throughput over both sessions


def test_resuming_a_finished_run_reports_its_metrics_and_cumulative_times(tmp_path):
    first = make_trainer(tmp_path, epochs=2, extra_classes=1)
    metrics = first.fit()
    again = make_trainer(tmp_path, epochs=2, extra_classes=1)
    assert json.dumps(again.fit(resume=True)) == json.dumps(metrics)  # NaN-aware equality
    assert again.train_images == first.train_images > 0
    assert again.train_seconds == first.train_seconds > 0
    saved_wall = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)["wall_seconds"]
    assert 0 < saved_wall <= again.wall_seconds == pytest.approx(first.wall_seconds, abs=0.5)  # not restarted at 0

    # a checkpoint without final metrics (written before this version): evaluated again
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    del state["metrics"], state["metrics_epoch"]
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    third = make_trainer(tmp_path, epochs=2, extra_classes=1)
    assert json.dumps(third.fit(resume=True)) == json.dumps(metrics)
    assert read_log(tmp_path / LOG_NAME)[-1]["event"] == "eval"


def test_checkpoint_rng_states_are_cpu_bytes_and_restore_from_the_cpu(tmp_path, monkeypatch):
    trainer = make_trainer(tmp_path, epochs=1)
    fake_cuda = [torch.arange(16, dtype=torch.uint8), torch.arange(16, 32, dtype=torch.uint8)]
    restored = {}

    def set_rng_state(state, device):
        assert state.device.type == "cpu" and state.dtype == torch.uint8  # what torch.cuda needs
        restored[device] = state.clone()

    torch.rand(5)  # away from the seeded state the next Trainer starts from
    with monkeypatch.context() as patch:  # a machine with 2 GPUs, seen through the RNG API only
        patch.setattr(torch.cuda, "is_available", lambda: True)
        patch.setattr(torch.cuda, "device_count", lambda: 2)
        patch.setattr(torch.cuda, "get_rng_state_all", lambda: [s.clone() for s in fake_cuda])
        patch.setattr(torch.cuda, "set_rng_state", set_rng_state)
        trainer.save_checkpoint()
        rng = torch.load(tmp_path / CHECKPOINT_NAME, map_location="cpu", weights_only=True)["rng"]
        for state in [rng["torch"], *rng["cuda"]]:
            assert state.device.type == "cpu" and state.dtype == torch.uint8
        expected_cpu = torch.get_rng_state()
        torch.rand(10)  # move on, so that restoring is visible
        assert make_trainer(tmp_path, epochs=1).load_checkpoint()
    assert torch.equal(torch.get_rng_state(), expected_cpu)
    assert sorted(restored) == [0, 1] and all(torch.equal(restored[i], fake_cuda[i]) for i in (0, 1))


@pytest.mark.parametrize("change, named", [(dict(lr=2e-2), "lr 0.01 -> 0.02"), (dict(epochs=4), "epochs 3 -> 4"),
                                           (dict(grad_accum=4), "grad_accum 2 -> 4"), (dict(seed=1), "seed 0 -> 1"),
                                           (dict(num_workers=1), "num_workers 0 -> 1"),
                                           (dict(amp=True), "amp False -> True")])
def test_resume_refuses_settings_that_change_the_trajectory(tmp_path, change, named):
    make_trainer(tmp_path).fit(until_epoch=1)
    with pytest.raises(CheckpointError, match=named):
        make_trainer(tmp_path, **change).fit(resume=True)


def test_resume_accepts_settings_that_only_change_logging_and_evaluation(tmp_path):
    make_trainer(tmp_path, epochs=2).fit(until_epoch=1)
    trainer = make_trainer(tmp_path, epochs=2, log_every=5, eval_every=0, eval_window=16, eval_stride=8)
    trainer.fit(resume=True)
    assert trainer.epoch == 2


@pytest.mark.parametrize("edit, message", [("drop", "missing 1 tensors"), ("add", "unexpected 1"),
                                           ("reshape", "does not fit this model")])
def test_resume_loads_the_model_strictly(tmp_path, edit, message):
    make_trainer(tmp_path).fit(until_epoch=1)
    state = torch.load(tmp_path / CHECKPOINT_NAME, weights_only=True)
    name = next(iter(state["model"]))
    if edit == "drop":
        del state["model"][name]
    elif edit == "add":
        state["model"]["adapters.default.stray"] = torch.zeros(3)
    else:
        state["model"][name] = torch.zeros(*state["model"][name].shape, 2)
    torch.save(state, tmp_path / CHECKPOINT_NAME)
    with pytest.raises(CheckpointError, match=message):
        make_trainer(tmp_path).fit(resume=True)


def test_resume_cuts_the_log_back_to_the_checkpoint(tmp_path):
    straight = make_trainer(tmp_path / "a")
    straight.fit()
    first = make_trainer(tmp_path / "b")
    first.fit(until_epoch=1)
    log = tmp_path / "b" / LOG_NAME
    with open(log, "a") as handle:  # the killed second epoch's lines, the last cut short
        handle.write(json.dumps({"event": "train", "epoch": 2, "step": first.step + 1, "loss": 1.0}) + "\n")
        handle.write('{"event": "train", "epo')
    make_trainer(tmp_path / "b").fit(resume=True)
    records = read_log(log)
    steps = [r["step"] for r in records if r["event"] == "train"]
    assert steps == list(range(1, straight.step + 1))
    assert [r["event"] for r in records].count("resume") == 1
    plain = [{k: v for k, v in r.items() if k != "images_per_s"} for r in records if r["event"] != "resume"]
    expected = [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_log(tmp_path / "a" / LOG_NAME)]
    assert plain == expected  # same losses, lrs and metrics as the uninterrupted run


# ------------------------------------------------------------------ non-finite steps
class NanOnCalls(PixelModel):
    """A :class:`PixelModel` with a BatchNorm whose input is NaN in training on the chosen calls
    (1-based; with ``grad_accum=2`` calls ``2s-1`` and ``2s`` make optimizer step ``s``)."""

    def __init__(self, nan_calls, num_classes):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, num_classes, 1)  # RGB and 1 depth channel
        self.bn = torch.nn.BatchNorm2d(num_classes)
        self.nan_calls, self.calls = set(nan_calls), 0

    def forward(self, rgb, aux):
        features = super().forward(rgb, aux)
        if self.training:
            self.calls += 1
            if self.calls in self.nan_calls:
                features = features * float("nan")
        return self.bn(features)


def nan_trainer(out, nan_calls, epochs=1, **overrides):
    """4 optimizer steps per epoch, 2 micro-batches each, warmup 0: every step has a rate > 0."""
    train, val = synthetic_sets()
    config = TrainConfig(**{**dict(epochs=epochs, batch_size=8, grad_accum=2, lr=1e-2, log_every=1,
                                   progress=False), **overrides})
    model = NanOnCalls(nan_calls, len(train.class_names))
    return Trainer(model, train, len(train.class_names), config, out, val_set=val, device="cpu", ctx=Dist())


def test_a_nan_step_is_skipped_counted_logged_and_leaves_weights_statistics_and_adamw_finite(tmp_path, capsys):
    trainer = nan_trainer(tmp_path, nan_calls={4})  # step 2's second micro-batch
    trainer.fit()
    assert trainer.step == 4 and trainer.nonfinite_steps == 1
    adam = [trainer.optimizer.state[p] for p in trainer.model.parameters()]
    assert all(int(state["step"]) == 3 for state in adam)  # the optimizer stepped 3 times, not 4
    assert trainer.scheduler.last_epoch == 4  # the schedule moved on
    finite = [*trainer.model.state_dict().values(), *(s[k] for s in adam for k in ("exp_avg", "exp_avg_sq"))]
    assert all(torch.isfinite(t).all() for t in finite)  # weights, BatchNorm statistics and AdamW moments
    assert int(trainer.model.bn.num_batches_tracked) == 6  # the skipped step's 2 batches undone
    records = read_log(tmp_path / LOG_NAME)
    parameters = ["conv.weight", "conv.bias", "bn.weight", "bn.bias"]
    assert [r for r in records if r["event"] == "nonfinite"] == [
        {"event": "nonfinite", "epoch": 1, "step": 2, "loss": None, "parameters": parameters}]
    assert [r["nonfinite_steps"] for r in records if r["event"] == "train"] == [0, 1, 1, 1]
    err = capsys.readouterr().err
    assert ("warning: step 2 (epoch 1): non-finite gradients of conv.weight, conv.bias, bn.weight and 1 more; "
            "optimizer step skipped (1 in a row, 5 stop the run)") in err
    resumed = nan_trainer(tmp_path, nan_calls=())
    assert resumed.load_checkpoint() and resumed.nonfinite_steps == 1  # the count survives a resume


def test_too_many_nan_steps_in_a_row_stop_the_run_and_keep_the_last_checkpoint(tmp_path):
    trainer = nan_trainer(tmp_path, nan_calls=range(9, 17), epochs=2, max_nonfinite_steps=3)  # all of epoch 2
    trainer.fit(until_epoch=1)
    checkpoint = (tmp_path / CHECKPOINT_NAME).read_bytes()
    with pytest.raises(NonFiniteError) as raised:
        trainer.fit(resume=True)
    message = str(raised.value)
    assert "\n" not in message and message.startswith("training stopped at step 7 (epoch 2): 3 optimizer steps")
    assert "conv.weight" in message and f"last good checkpoint {tmp_path / CHECKPOINT_NAME} (epoch 1) is kept" in message
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == checkpoint
    assert [r["step"] for r in read_log(tmp_path / LOG_NAME) if r["event"] == "nonfinite"] == [5, 6, 7]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_max_nonfinite_steps_is_validated_and_may_change_on_resume(tmp_path):
    with pytest.raises(ValueError, match="max_nonfinite_steps must be a positive integer"):
        TrainConfig(max_nonfinite_steps=0)
    make_trainer(tmp_path, epochs=2).fit(until_epoch=1)
    make_trainer(tmp_path, epochs=2, max_nonfinite_steps=50).fit(resume=True)  # decides when to stop, not a step


# ------------------------------------------------------------------ DDP (2 gloo processes)
class RankData(torch.utils.data.Dataset):
    """Each rank sees its own constant image: confidently right on rank 0, wrong on rank 1."""

    def __len__(self):
        return 16

    def __getitem__(self, index):
        sign = 1.0 if torch.distributed.get_rank() == 0 else -1.0
        return {"rgb": torch.full((3, 4, 4), sign), "aux": torch.zeros(1, 4, 4),
                "label": torch.zeros(4, 4, dtype=torch.long)}


class FixedLogits(torch.nn.Module):
    """Logits ``(5 m, -5 m) + bias`` with ``m`` the mean RGB value; only the bias trains."""

    def __init__(self):
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(2, 1, 1))

    def forward(self, rgb, aux):
        m = rgb.mean(1, keepdim=True)
        return torch.cat([5 * m, -5 * m], 1) + self.bias


class ValData(torch.utils.data.Dataset):
    """Five fixed images (an odd count: the ranks evaluate 3 and 2 of them), the same on every rank."""

    def __len__(self):
        return 5

    def __getitem__(self, index):
        generator = torch.Generator().manual_seed(index)
        return {"rgb": torch.randn(3, 4, 4, generator=generator), "aux": torch.zeros(1, 4, 4),
                "label": torch.randint(0, 2, (4, 4), generator=generator)}


def _ddp_worker(rank, port, out, queue):
    # what torchrun sets for each process it launches, read by init_distributed as gopt train does
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")
    torch.set_num_threads(1)
    ctx = init_distributed()
    try:
        config = TrainConfig(epochs=1, batch_size=8, grad_accum=2, lr=1e-9, log_every=1, progress=False, amp=False)
        trainer = Trainer(FixedLogits(), RankData(), 2, config, out, val_set=ValData(), device="cpu", ctx=ctx)
        calls = []

        def counting_allreduce(state, bucket):
            calls.append(1)
            tensor = bucket.buffer().div_(2)
            return torch.distributed.all_reduce(tensor, async_op=True).get_future().then(lambda f: f.value()[0])

        trainer.ddp.register_comm_hook(None, counting_allreduce)
        metrics = trainer.fit()
        # no tensors in the queue: a queued tensor is shared through this process, which ends before it is read
        queue.put((rank, len(calls), trainer.step, metrics["miou"], trainer.model.bias.flatten().tolist()))
        trainer.close()  # DDP's reducer before the process group, or gloo may abort the process
    finally:
        shutdown_distributed()


def test_ddp_under_torchruns_environment(tmp_path):
    """Two gloo processes joined as torchrun joins them: gradients are accumulated without a
    sync (one all-reduce per step), one rank writes the log, with the loss averaged over ranks,
    and the metrics summed over both ranks' halves of the validation set equal one process's."""
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    queue = context.SimpleQueue()
    mp.start_processes(_ddp_worker, args=(port, str(tmp_path), queue), nprocs=2, start_method="spawn")
    results = sorted((queue.get() for _ in range(2)), key=lambda result: result[0])
    steps = results[0][2]
    assert steps == 2  # 8 samples per rank, micro-batches of 2, 2 per step
    assert [calls for _, calls, *_ in results] == [steps, steps]  # one all-reduce per step, not per micro-batch
    records = read_log(tmp_path / LOG_NAME)
    losses = [r["loss"] for r in records if r["event"] == "train"]
    right, wrong = math.log1p(math.exp(-10)), 10 + math.log1p(math.exp(-10))  # rank 0's and rank 1's loss
    assert len(losses) == steps and losses == pytest.approx([(right + wrong) / 2] * steps, rel=1e-5)
    assert [r["step"] for r in records if r["event"] == "train"] == [1, 2]  # one writer, no duplicates
    assert results[0][4] == results[1][4]  # the ranks stayed in step
    model = FixedLogits()
    with torch.no_grad():
        model.bias.copy_(torch.tensor(results[0][4]).view_as(model.bias))
    single = evaluate(model, ValData(), 2)
    assert results[0][3] == results[1][3] == pytest.approx(single["miou"], abs=1e-12)


class DayNightData(torch.utils.data.Dataset):
    """Six 4x4 samples with stems ``0D``, ``1N``, ``2D``, ... (MFNet's day/night naming); the
    rgb value is the class :class:`ConstantClass` predicts, the label one fixed pattern."""

    def __init__(self):
        self.samples = [type("Files", (), {"stem": f"{i}{'DN'[i % 2]}"})() for i in range(6)]

    @staticmethod
    def subset_of(stem):
        return {"D": "day", "N": "night"}.get(stem[-1])

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        label = torch.tensor([[0, 1, 2, 1]] * 4)
        return {"rgb": torch.full((3, 4, 4), float(index % 3)), "aux": torch.zeros(1, 4, 4), "label": label,
                "meta": {"stem": self.samples[index].stem}}


class ConstantClass(torch.nn.Module):
    def forward(self, rgb, aux):
        return torch.nn.functional.one_hot(rgb[:, 0].long(), 3).permute(0, 3, 1, 2).float()  # [B, 3, H, W]


def test_evaluation_reports_each_named_subset_from_the_same_pass():
    data = DayNightData()
    metrics = evaluate(ConstantClass(), data, 3)
    for name, indices in (("day", [0, 2, 4]), ("night", [1, 3, 5])):
        reference = SegMetrics(3)
        for index in indices:  # predicted class = index % 3 everywhere
            sample = data[index]
            reference.update(torch.full((4, 4), index % 3), sample["label"])
        assert metrics["subsets"][name] == reference.compute()
    assert metrics["total"] == metrics["subsets"]["day"]["total"] + metrics["subsets"]["night"]["total"]
    assert "subsets" not in evaluate(ConstantClass(), torch.utils.data.Subset(data, range(6)), 3)
