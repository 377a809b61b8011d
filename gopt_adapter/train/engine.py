"""Training and evaluation loop for any ``model(rgb, aux) -> logits`` segmenter.

Trains exactly the parameters that require grad (AdamW, polynomial decay with linear
warmup, gradient accumulation and clipping, the loss ``config.loss`` with ignore value 255:
cross-entropy, class-weighted cross-entropy or OHEM, see :mod:`gopt_adapter.train.losses`, plus
``model.regularization_loss()`` where the model has one, as the two-stream FFT does); with bf16
autocast (``amp``: on by default on CUDA, off by default on the CPU, where it is slower but
lets the mixed-precision path be tested) and optional ``torch.compile``; under ``torchrun``
with DDP (nccl on CUDA, gloo on CPU). Rank 0 alone writes the JSONL log and an atomic
checkpoint after every epoch; ``resume=True`` continues from it, reproducing the
uninterrupted run exactly (data order, Gumbel noise and transforms all draw from RNG states
stored in the checkpoint). Resuming loads the checkpoint strictly and refuses settings that
would change the trajectory; the log is cut back to the checkpoint, and the last metrics,
wall time and throughput carry over. A step whose loss or gradients are not finite is skipped
and counted; too many in a row stop the run with :class:`NonFiniteError`.
"""

from __future__ import annotations

import contextlib
import gc
import io
import json
import math
import os
import random
import sys
import time
import warnings
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ..atomic_files import atomic_write_bytes
from ..inference import NO_TTA, TTAConfig, check_window, segment, size_multiple, tta_scores
from .losses import LOSSES, OHEM_MIN_KEPT, OHEM_THRESH, build_loss, check_ohem_settings
from .metrics import SegMetrics
from .tensorboard import TENSORBOARD_FOLDER, TensorBoardLog, check_tensorboard
from ..numerics import finite_flags, shown
from ..errors import CheckpointError, NonFiniteError, UsageError
from ..labels import IGNORE_INDEX

CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"

#: TrainConfig fields that may differ between a checkpoint and the run resuming it: they only
#: change what is logged, evaluated or shown (evaluation draws from its own RNG), or, for
#: ``max_nonfinite_steps``, whether a run stops, never what any step computes (a skipped step is
#: skipped under every limit; raising the limit lets a run that stopped resume past the steps
#: that stopped it). Every other field (``num_workers`` too: transforms draw from per-worker
#: RNGs; ``amp``/``compile``/``grad_checkpointing``: numerics) must match.
RESUME_FREE_FIELDS = frozenset({"eval_every", "eval_window", "eval_stride", "log_every", "progress",
                                "max_nonfinite_steps", "logger"})
#: Where a run's log goes besides ``log.jsonl`` (which is always written).
LOGGERS = ("jsonl", "tensorboard")
NONFINITE_LOGGED_NAMES = 10  # parameter names in a "nonfinite" log record


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation and run settings (the paper's: batch 64, 60 epochs, AdamW, LR 4e-5, poly)."""

    epochs: int = 60
    batch_size: int = 64  # per optimizer step, over all processes and accumulation steps
    lr: float = 4e-5
    weight_decay: float = 0.01
    warmup_steps: int = 0
    poly_power: float = 1.0
    grad_accum: int = 1
    clip_grad_norm: float | None = None
    amp: bool | None = None  # bf16 autocast; None = on on CUDA, off on the CPU (see resolve_amp)
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; "aot_eager" skips code generation
    grad_checkpointing: bool = False
    num_workers: int = 0
    seed: int = 0
    eval_every: int = 1  # epochs; 0 = only at the end
    eval_window: int | None = None  # sliding-window size for large images (None = whole image)
    eval_stride: int | None = None  # None = eval_window (no overlap)
    log_every: int = 10  # optimizer steps
    progress: bool = True
    max_nonfinite_steps: int = 5  # skipped non-finite steps in a row that stop the run (NonFiniteError)
    loss: str = "ce"  # one of losses.LOSSES: "ce" (the paper's), "ce_weighted" (needs class_weights), "ohem"
    ohem_thresh: float = OHEM_THRESH  # ohem: pixels whose probability of their class is below this count...
    ohem_min_kept: int = OHEM_MIN_KEPT  # ...but at least this many per batch (the hardest)
    logger: str = "jsonl"  # one of LOGGERS: "tensorboard" also writes TensorBoard event files (the tb extra)

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every", "max_nonfinite_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "num_workers", "eval_every", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive float, got {self.lr}")
        if self.weight_decay < 0 or self.poly_power < 0:
            raise ValueError("weight_decay and poly_power must be >= 0")
        if self.clip_grad_norm is not None and self.clip_grad_norm <= 0:
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {self.clip_grad_norm}")
        if self.amp is not None and not isinstance(self.amp, bool):
            raise ValueError(f"amp must be true, false or null (on on CUDA only), got {self.amp!r}")
        for name in ("compile", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if not (isinstance(self.compile_backend, str) and self.compile_backend):
            raise ValueError(f"compile_backend must name a torch.compile backend, got {self.compile_backend!r}")
        check_window(self.eval_window, self.eval_stride, prefix="eval_")
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        check_ohem_settings(self.ohem_thresh, self.ohem_min_kept)
        if self.loss != "ohem" and (self.ohem_thresh, self.ohem_min_kept) != (OHEM_THRESH, OHEM_MIN_KEPT):
            raise ValueError(f"ohem_thresh and ohem_min_kept need loss 'ohem' (the loss is {self.loss!r})")
        if self.logger not in LOGGERS:
            raise ValueError(f"logger must be one of {LOGGERS}, got {self.logger!r}")
        if self.logger == "tensorboard":
            check_tensorboard()


# ------------------------------------------------------------------ distributed
@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed() -> Dist:
    """Joins the ``torchrun`` process group when launched by it; single process otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Dist()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend)
    return Dist(rank, world_size, local_rank)


def shutdown_distributed() -> None:
    """Leaves the process group, if any; close every :class:`Trainer` first (see ``close``)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def resolve_device(name: str | None = None, ctx: Dist | None = None) -> torch.device:
    """The one device resolver (``--device`` of every command, the trainer's default): ``name``
    checked against this machine, or with none this rank's GPU when there is one, else the CPU.
    Raises :class:`~gopt_adapter.errors.UsageError` for a device this machine does not have."""
    if not name:
        local_rank = ctx.local_rank if ctx is not None else 0
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}: use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"device {name} requested but CUDA is not available: use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UsageError(f"device {name} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return device


# ------------------------------------------------------------------ schedule & state
def poly_lr_factor(step: int, total_steps: int, warmup_steps: int, power: float) -> float:
    """Linear warmup to 1, then ``(1 - progress) ** power`` down to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - progress) ** power


def trainable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The live trainable parameters and the buffers of the modules that own them (e.g.
    BatchNorm statistics), by state-dict name."""
    state = {}
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, tensor in [*own, *module.named_buffers(recurse=False)]:
            if not isinstance(tensor, nn.Parameter) or tensor.requires_grad:
                state[prefix + name] = tensor
    return state


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """A detached copy of :func:`trainable_tensors`: what a checkpoint or ``trained.safetensors`` holds."""
    return {name: tensor.detach().clone() for name, tensor in trainable_tensors(model).items()}


def _rng_state() -> dict[str, Any]:
    """Every RNG training draws from, as CPU tensors and plain values (weights_only-loadable)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],  # CPU uint8, one per GPU
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    """Restores :func:`_rng_state`; RNG states are always set from CPU byte tensors."""
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        for index, cuda_state in enumerate(state["cuda"][: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state.cpu(), index)
    version, gstate, internal = state["python"]
    random.setstate((version, tuple(gstate), internal))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN for a class never seen, inf) replaced by
    ``None``, tuples as lists: writable as standard JSON (``allow_nan=False``)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    return value


def json_line(record: dict[str, Any]) -> str:
    """One standard-JSON line (NaN written as null)."""
    return json.dumps(json_safe(record), allow_nan=False)


# ------------------------------------------------------------------ evaluation
#: What :func:`evaluate` hands each image's prediction to: ``(index in the dataset, prediction
#: [H, W], label [H, W])``, both int64 on the evaluation device (``gopt eval --show-dir``).
PredictionCallback = Callable[[int, torch.Tensor, torch.Tensor], None]


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, device: torch.device | str = "cpu",
             ctx: Dist = Dist(), window: int | None = None, stride: int | None = None, amp: bool | None = None,
             progress: bool = False, tta: TTAConfig | None = None,
             on_prediction: PredictionCallback | None = None) -> dict[str, Any]:
    """Full-size evaluation (batch 1, images may differ in size), summed over all ranks.

    Metrics are taken at the label's resolution: logits of inputs the transform scaled
    (``image_scale``) are resized to it first (:func:`~gopt_adapter.data.transforms.resize_logits`).
    ``window``/``stride`` run each input by sliding window, ``tta`` over test-time augmentations
    (the mean softmax of every view at the label's resolution, each view by sliding window where
    ``window`` is given; :func:`~gopt_adapter.inference.tta_scores`); without ``tta`` each image is
    one view, as it is. ``on_prediction`` sees every image's prediction and label, in order.
    Where ``dataset`` names subsets of its samples (a ``subset_of(stem) -> name | None`` method,
    e.g. MFNet's day and night frames), the result also holds ``"subsets": {name: metrics}``,
    from the same pass. Draws nothing from the global RNGs, so evaluating during training leaves
    the training trajectory unchanged (``eval_every`` may differ on resume).
    """
    check_window(window, stride)
    was_training = model.training
    model.eval()
    indices = range(ctx.rank, len(dataset), ctx.world_size)  # no padding duplicates
    # its own generator: the loader's base seed would otherwise come from torch's global RNG
    loader = DataLoader(Subset(dataset, indices), batch_size=1, shuffle=False, num_workers=0,
                        generator=torch.Generator())
    metrics = SegMetrics(num_classes, IGNORE_INDEX, device=device)
    subset_of = getattr(dataset, "subset_of", None)
    names = {subset_of(files.stem) for files in dataset.samples} - {None} if subset_of is not None else set()
    # every rank holds every name, seen or not: the sync is a collective
    subsets = {name: SegMetrics(num_classes, IGNORE_INDEX, device=device) for name in sorted(names)}
    autocast = _autocast(device, amp)

    def forward(rgb: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:  # the model alone under autocast
        with autocast:
            return segment(model, rgb, aux, num_classes, window, stride)  # [1, K, h, w]

    for batch, index in zip(terminal_progress(loader, "eval", progress and ctx.is_main), indices):
        rgb, aux = batch["rgb"].to(device), batch["aux"].to(device)
        label = batch["label"].to(device)  # [1, H, W]
        scores = tta_scores(forward, rgb, aux, label.shape[-2:], tta or NO_TTA, size_multiple(model))  # [1, K, H, W]
        prediction = scores.argmax(1)  # [1, H, W]
        metrics.update(prediction, label)
        if subsets:
            name = subset_of(batch["meta"]["stem"][0])
            if name is not None:
                subsets[name].update(prediction, label)
        if on_prediction is not None:
            on_prediction(index, prediction[0], label[0])
    result = {}
    for name, accumulator in (("", metrics), *subsets.items()):
        accumulator.sync()
        result[name] = accumulator.compute()
    model.train(was_training)
    overall = result.pop("")
    return {**overall, "subsets": result} if result else overall


AMP_DEVICES = ("cuda", "cpu")


def resolve_amp(amp: bool | None, device: torch.device | str) -> bool:
    """Whether bf16 autocast runs: ``amp`` itself, or with ``None`` only on CUDA (on the CPU
    bf16 is slower than fp32 on most machines; ``amp=True`` there tests the mixed-precision path)."""
    device = torch.device(device)
    if amp is None:
        return device.type == "cuda"
    if amp and device.type not in AMP_DEVICES:
        raise ValueError(f"amp=True needs one of {AMP_DEVICES}, not {device.type!r}")
    return amp


def _autocast(device: torch.device | str, amp: bool | None):
    """bf16 autocast on ``device`` if :func:`resolve_amp` says so. Parameters, BatchNorm
    statistics and the loss stay float32; the Gumbel assignment is computed in float32
    (:func:`gopt_adapter.grouping.gumbel_assignment`)."""
    device = torch.device(device)
    enabled = resolve_amp(amp, device)
    return torch.autocast(device.type if enabled else "cpu", dtype=torch.bfloat16, enabled=enabled)


def live_progress(enabled: bool) -> bool:
    """Live bars only where a person watches them: ``enabled`` and stderr is a terminal. A log
    file, a batch job or CI gets plain lines instead (:meth:`Trainer.train_epoch`): a bar's
    ``\\r`` updates would fill it with lines of tens of kB."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(enabled and isatty is not None and isatty())


def terminal_progress(iterable: Iterable | None, desc: str, enabled: bool, total: int | None = None, **kwargs):
    """A tqdm bar on stderr over ``iterable`` (``None``: a manual bar) where :func:`live_progress`
    allows; otherwise ``iterable`` itself (``None`` for a manual bar)."""
    if not live_progress(enabled):
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True, **kwargs)


def progress_line(epoch: int, epochs: int, step: int, total_steps: int, loss: float, lr: float,
                  images_per_s: float, eta_s: float | None) -> str:
    """The plain progress line written where no bar is shown, e.g.
    ``epoch 2/4 step 40/64 loss 0.8123 lr 5.00e-04 61.2 img/s ETA 00:00:19``."""
    if eta_s is None or not math.isfinite(eta_s):
        eta = "-"
    else:
        seconds = int(max(eta_s, 0.0))
        eta = f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"  # hours may pass 24
    return (f"epoch {epoch}/{epochs} step {step}/{total_steps} loss {loss:.4f} lr {lr:.2e} "
            f"{images_per_s:.1f} img/s ETA {eta}")


# ------------------------------------------------------------------ training
class Trainer:
    """Trains ``model`` on ``train_set``; evaluates on ``val_set``; checkpoints to ``out_dir``.

    Besides the weights, the trainer carries over resumes: ``metrics`` (the last evaluation)
    and ``metrics_epoch``, ``wall_seconds`` (time spent in :meth:`fit`, summed over sessions
    up to the last checkpoint), ``train_images`` / ``train_seconds`` (over all ranks, for
    throughput) and ``nonfinite_steps``. Work after the last checkpoint of a killed session is
    redone, not counted.

    An optimizer step whose loss (averaged over ranks) or any gradient holds a NaN or an inf is
    skipped: no optimizer update (weights and AdamW moments stay finite) and the buffers its
    forward passes moved (BatchNorm statistics) restored, but the schedule and the step count
    advance, so later steps keep the rates of an uninterrupted run. Each skip is counted in
    ``nonfinite_steps``, logged (a ``"nonfinite"`` record naming the parameters) and warned
    about on stderr; ``max_nonfinite_steps`` in a row raise :class:`NonFiniteError`.

    ``class_weights`` (float ``[num_classes]``, e.g. ``losses.enet_class_weights`` of the
    training labels' counts) is required by ``config.loss="ce_weighted"`` and refused otherwise.
    """

    def __init__(self, model: nn.Module, train_set: Dataset, num_classes: int, config: TrainConfig,
                 out_dir: str | os.PathLike, val_set: Dataset | None = None, device: torch.device | str | None = None,
                 ctx: Dist | None = None, class_weights: torch.Tensor | None = None) -> None:
        self.ctx = ctx or init_distributed()
        self.device = torch.device(device) if device is not None else resolve_device(None, self.ctx)
        # amp resolved for this device: the checkpoint records, and resume compares, what ran
        self.config = config = replace(config, amp=resolve_amp(config.amp, self.device))
        self.num_classes = num_classes
        if class_weights is not None:
            if tuple(class_weights.shape) != (num_classes,):
                raise ValueError(f"class_weights must hold one weight per class ({num_classes}), got shape "
                                 f"{tuple(class_weights.shape)}")
            if not bool((torch.isfinite(class_weights) & (class_weights > 0)).all()):
                raise ValueError(f"class_weights must be finite and > 0, got {class_weights.tolist()}")
            class_weights = class_weights.to(self.device, torch.float32)
        self.loss = build_loss(config.loss, class_weights, config.ohem_thresh, config.ohem_min_kept, IGNORE_INDEX)
        self.out_dir = Path(out_dir)
        self.train_set, self.val_set = train_set, val_set
        per_step = config.batch_size // config.grad_accum
        if per_step % self.ctx.world_size:
            raise ValueError(f"batch per accumulation step {per_step} is not divisible by {self.ctx.world_size} processes")
        self.micro_batch = per_step // self.ctx.world_size
        seed_everything(config.seed)
        self.model = model.to(self.device)
        if config.grad_checkpointing:
            if not hasattr(model, "set_grad_checkpointing"):
                raise ValueError(f"{type(model).__name__} has no set_grad_checkpointing()")
            model.set_grad_checkpointing(True)
        self._trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        params = [p for _, p in self._trainable]
        if not params:
            raise ValueError("the model has no parameter that requires grad: nothing to train")
        # what a step's forward passes move (BatchNorm statistics): put back when the step is skipped
        self._step_buffers = [t for t in trainable_tensors(model).values() if not isinstance(t, nn.Parameter)]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = DistributedSampler(train_set, num_replicas=self.ctx.world_size, rank=self.ctx.rank,
                                          shuffle=True, seed=config.seed, drop_last=True)
        self.loader = DataLoader(train_set, batch_size=self.micro_batch, sampler=self.sampler, drop_last=True,
                                 num_workers=config.num_workers, pin_memory=self.device.type == "cuda")
        self.steps_per_epoch = len(self.loader) // config.grad_accum
        if self.steps_per_epoch == 0:
            raise ValueError(f"{len(train_set)} training samples are fewer than one batch of {config.batch_size}")
        self.total_steps = self.steps_per_epoch * config.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: poly_lr_factor(step, self.total_steps, config.warmup_steps, config.poly_power)
        )
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.forward = self._build_forward(model)
        self.board: TensorBoardLog | None = None  # opened by fit() with logger "tensorboard"
        self.epoch, self.step = 0, 0
        self.train_images, self.train_seconds = 0, 0.0  # over all ranks, for throughput
        self.wall_seconds = 0.0
        self.nonfinite_steps, self.nonfinite_streak = 0, 0  # skipped steps: in all, and in a row now
        self._session = (time.perf_counter(), 0)  # start time and step of this fit(), for the ETA
        self.metrics: dict[str, Any] = {}
        self.metrics_epoch: int | None = None  # the epoch self.metrics were measured after
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def _build_forward(self, model: nn.Module) -> nn.Module:
        forward = model
        if self.ctx.world_size > 1:
            forward = self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.compile:
            # Our model code causes no graph break; it recompiles once per image size (timm's
            # position-embedding resampling specialises on it) and once per adapter
            # (set_adapter), then reuses the cached graphs (docs/performance.md#torchcompile).
            forward = torch.compile(forward, backend=self.config.compile_backend)
        return forward

    # --------------------------------------------------------------- checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.out_dir / CHECKPOINT_NAME

    def save_checkpoint(self) -> None:
        if not self.ctx.is_main:
            return
        state = {
            "model": trainable_state_dict(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "rng": _rng_state(),
            "config": asdict(self.config),
            "world_size": self.ctx.world_size,
            "metrics": self.metrics,
            "metrics_epoch": self.metrics_epoch,
            "wall_seconds": self.wall_seconds,
            "train_images": self.train_images,
            "train_seconds": self.train_seconds,
            "nonfinite_steps": self.nonfinite_steps,
            "nonfinite_streak": self.nonfinite_streak,
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        """Restores the last checkpoint if there is one; returns whether it did.

        Raises :class:`CheckpointError` when it does not fit: other trainable tensors than the
        model's, or settings that change the trajectory (see ``RESUME_FREE_FIELDS``).
        """
        path = self.checkpoint_path
        if not path.exists():
            return False
        # On the CPU: load_state_dict moves weights and optimizer state to their parameters'
        # device, and the RNG setters need CPU byte tensors.
        state = torch.load(path, map_location="cpu", weights_only=True)
        differences = _config_differences(state["config"], self.config)
        saved_world = state.get("world_size", self.ctx.world_size)
        if saved_world != self.ctx.world_size:
            differences.append(f"processes {saved_world} -> {self.ctx.world_size}")
        if differences:
            raise CheckpointError(f"{path} was written with other training settings ({'; '.join(differences)}): "
                                  "resume with the checkpoint's settings, or start a new run in another folder")
        expected, saved = set(trainable_state_dict(self.model)), set(state["model"])
        if expected != saved:
            missing, unexpected = sorted(expected - saved), sorted(saved - expected)
            raise CheckpointError(f"{path} does not fit this model: missing {len(missing)} tensors {missing[:5]}, "
                                  f"unexpected {len(unexpected)} {unexpected[:5]}; was it written for another "
                                  "variant or backbone?")
        try:
            self.model.load_state_dict(state["model"], strict=False)  # strict=False: frozen weights are not saved
        except RuntimeError as exc:  # shape mismatches
            raise CheckpointError(f"{path} does not fit this model: {str(exc).strip().splitlines()[-1].strip()}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.metrics, self.metrics_epoch = state.get("metrics", {}), state.get("metrics_epoch")
        self.wall_seconds = state.get("wall_seconds", 0.0)
        self.train_images, self.train_seconds = state.get("train_images", 0), state.get("train_seconds", 0.0)
        self.nonfinite_steps, self.nonfinite_streak = state.get("nonfinite_steps", 0), state.get("nonfinite_streak", 0)
        _set_rng_state(state["rng"])
        return True

    def sync_buffers(self) -> None:
        """Gives every rank rank 0's buffers (BatchNorm statistics drift apart under DDP), so all
        ranks evaluate, and rank 0 saves, one and the same model."""
        if self.ctx.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    # ------------------------------------------------------------------- logging
    @property
    def log_path(self) -> Path:
        return self.out_dir / LOG_NAME

    def log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.log_path, "a") as handle:
                handle.write(json_line(record) + "\n")
            if self.board is not None:
                self.board.record(record)

    def _restart_log(self) -> None:
        """Atomically cuts the log back to the records up to the current step and epoch (none
        for a fresh run): a resumed run redoes, and logs again, what came after its checkpoint."""
        if not self.ctx.is_main:
            return
        kept = []
        if self.step and self.log_path.exists():
            for line in self.log_path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if record.get("step", 0) <= self.step and record.get("epoch", 0) <= self.epoch:
                    kept.append(json_line(record) + "\n")
        atomic_write_bytes(self.log_path, "".join(kept).encode())

    # ---------------------------------------------------------------------- loop
    def fit(self, resume: bool = False, until_epoch: int | None = None) -> dict[str, Any]:
        """Runs the remaining epochs, up to ``until_epoch`` (default: all); returns the last
        evaluation (empty without ``val_set``). A finished run that is resumed trains nothing
        and returns its final metrics, evaluating again if the checkpoint lacks them."""
        config = self.config
        until = config.epochs if until_epoch is None else until_epoch
        if not (isinstance(until, int) and 1 <= until <= config.epochs):
            raise ValueError(f"until_epoch must be in 1..{config.epochs}, got {until_epoch!r}")
        resumed = resume and self.load_checkpoint()
        self._restart_log()
        if config.logger == "tensorboard" and self.ctx.is_main and self.board is None:
            self.board = TensorBoardLog(self.out_dir / TENSORBOARD_FOLDER)
            if not resumed:  # once per run: a resumed run appends to the same event files
                self.board.settings(asdict(config))
        if resumed:
            self.log({"event": "resume", "epoch": self.epoch, "step": self.step})
        start, before = time.perf_counter(), self.wall_seconds
        self._session = (start, self.step)
        for epoch in range(self.epoch, until):
            self.train_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == config.epochs
            if self.val_set is not None and (last or (config.eval_every and self.epoch % config.eval_every == 0)):
                self._evaluate_and_log()
            self.sync_buffers()
            self.wall_seconds = before + time.perf_counter() - start
            self.save_checkpoint()
        if self.val_set is not None and self.epoch == config.epochs and self.metrics_epoch != self.epoch:
            self._evaluate_and_log()  # a finished run whose checkpoint holds no final metrics
        self.wall_seconds = before + time.perf_counter() - start
        return self.metrics

    def close(self) -> None:
        """Drops the DDP wrapper (and a compiled forward); the model and results stay usable.

        DDP's reducer must be gone before the process group is destroyed, even at interpreter
        exit: the other order aborts the process with gloo ("terminate called without an
        active exception", 5 of 12 two-process runs on torch 2.14).
        """
        self.ddp = None
        self.forward = self.model
        if self.board is not None:
            self.board.close()
            self.board = None
        gc.collect()  # the reducer sits in reference cycles with its hooks

    def evaluate(self) -> dict[str, Any]:
        self.sync_buffers()
        config = self.config
        return evaluate(self.model, self.val_set, self.num_classes, self.device, self.ctx,
                        config.eval_window, config.eval_stride, config.amp, config.progress)

    def _evaluate_and_log(self) -> None:
        self.metrics, self.metrics_epoch = self.evaluate(), self.epoch
        self.log({"event": "eval", "epoch": self.epoch, "step": self.step, **_scalars(self.metrics)})
        if self.board is not None:
            self.board.evaluation(self.metrics, self.step, getattr(self.val_set, "class_names", None))
        if self.config.progress and self.ctx.is_main:
            shown = " ".join(f"{k} {v:.4f}" for k, v in _scalars(self.metrics).items() if k in ("miou", "pixel_acc"))
            print(f"eval after epoch {self.epoch}/{self.config.epochs}: {shown}", file=sys.stderr, flush=True)

    def _print_progress(self, epoch: int, loss: float, lr: float, images_per_s: float) -> None:
        """One plain line on stderr, every ``log_every`` steps and at each epoch's end, where no
        live bar is shown (see :func:`live_progress`)."""
        if not self.config.progress or not self.ctx.is_main or live_progress(True):
            return
        started, first_step = self._session
        done = self.step - first_step
        eta = (time.perf_counter() - started) / done * (self.total_steps - self.step) if done > 0 else None
        print(progress_line(epoch, self.config.epochs, self.step, self.total_steps, loss, lr, images_per_s, eta),
              file=sys.stderr, flush=True)

    def _grad_sync(self, final_micro_batch: bool):
        """DDP all-reduces gradients on the last micro-batch of an accumulation step only."""
        if self.ddp is None or final_micro_batch:
            return contextlib.nullcontext()
        return self.ddp.no_sync()

    def _mean_over_ranks(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` averaged over all ranks (every rank takes part), on the device."""
        if self.ctx.world_size > 1:
            value = value.detach().clone()
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            value /= self.ctx.world_size
        return value

    def _nonfinite_parameters(self, loss: torch.Tensor) -> list[str] | None:
        """``None`` when ``loss`` and every gradient are finite; else the names of the parameters
        whose gradients are not (empty when the loss alone is not). One device sync per optimizer
        step. Every rank decides alike: ``loss`` is the mean over ranks, gradients all-reduced."""
        named = [(name, p.grad) for name, p in self._trainable if p.grad is not None]
        loss_ok, *grads_ok = finite_flags([loss, *(grad for _, grad in named)])
        if loss_ok and all(grads_ok):
            return None
        return [name for (name, _), ok in zip(named, grads_ok) if not ok]

    def _record_nonfinite(self, epoch: int, loss: torch.Tensor, parameters: list[str]) -> None:
        """Counts a skipped step, logs it (a JSONL record and a stderr line) and raises
        :class:`NonFiniteError` when ``max_nonfinite_steps`` steps in a row were skipped."""
        self.nonfinite_steps += 1
        self.nonfinite_streak += 1
        step, limit = self.step + 1, self.config.max_nonfinite_steps  # numbered as the train records are
        self.log({"event": "nonfinite", "epoch": epoch, "step": step, "loss": float(loss),
                  "parameters": parameters[:NONFINITE_LOGGED_NAMES]})
        where = f"gradients of {shown(parameters, 3)}" if parameters else "loss (the gradients are finite)"
        if self.ctx.is_main:
            print(f"warning: step {step} (epoch {epoch}): non-finite {where}; optimizer step skipped "
                  f"({self.nonfinite_streak} in a row, {limit} stop the run)", file=sys.stderr, flush=True)
        if self.nonfinite_streak < limit:
            return
        kept = (f"the last good checkpoint {self.checkpoint_path} (epoch {self.epoch}) is kept" if self.epoch
                else "no checkpoint was written (no epoch completed)")
        raise NonFiniteError(f"training stopped at step {step} (epoch {epoch}): {limit} optimizer steps in a row "
                             f"had a non-finite {where}; {kept}; lower the learning rate or set clip_grad_norm "
                             "and train again")

    def _advance_schedule(self, skipped: bool) -> None:
        """One step of the LR schedule, for a skipped optimizer step too (the schedule is a
        function of the step index). torch warns when the scheduler steps before the optimizer
        ever has, as after a skipped first step: deliberate here, so silenced, and only then
        (changing the warning filters every step would show once-only warnings again)."""
        if not skipped:
            self.scheduler.step()
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
            self.scheduler.step()

    def train_epoch(self, epoch: int) -> None:
        config = self.config
        self.model.train()
        self.sampler.set_epoch(epoch)
        autocast = _autocast(self.device, config.amp)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        regularization = getattr(self.model, "regularization_loss", None)
        start, seen = time.perf_counter(), 0
        running = torch.zeros((), device=self.device)  # this rank's loss of the current step
        batches = terminal_progress(self.loader, f"epoch {epoch + 1}/{config.epochs}",
                                    config.progress and self.ctx.is_main)
        for index, batch in enumerate(batches):
            if index >= self.steps_per_epoch * config.grad_accum:
                break
            final = (index + 1) % config.grad_accum == 0
            if index % config.grad_accum == 0:  # a step begins
                buffers_before = [buffer.clone() for buffer in self._step_buffers]
            rgb = batch["rgb"].to(self.device, non_blocking=True)
            aux = batch["aux"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            with self._grad_sync(final):
                with autocast:
                    logits = self.forward(rgb, aux)
                loss = self.loss(logits.float(), label)
                if regularization is not None:  # e.g. the two-stream FFT's L1 term on its LayerNorm gains
                    loss = loss + regularization()
                loss = loss / config.grad_accum
                loss.backward()
            running += loss.detach()
            seen += rgb.shape[0] * self.ctx.world_size
            if not final:
                continue
            step_loss = self._mean_over_ranks(running)  # [] the step's loss, every rank takes part
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            nonfinite = self._nonfinite_parameters(step_loss)
            if nonfinite is None:
                if config.clip_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.clip_grad_norm)
                self.optimizer.step()
                self.nonfinite_streak = 0
            else:
                if self._step_buffers:  # the statistics of NaN activations would poison every later evaluation
                    torch._foreach_copy_(self._step_buffers, buffers_before)
                self._record_nonfinite(epoch + 1, step_loss, nonfinite)  # raises after too many in a row
            self.optimizer.zero_grad(set_to_none=True)
            self._advance_schedule(skipped=nonfinite is not None)
            self.step += 1
            if self.step % config.log_every == 0 or self.step % self.steps_per_epoch == 0:
                loss_value = float(step_loss)
                elapsed = time.perf_counter() - start
                self.log({"event": "train", "epoch": epoch + 1, "step": self.step, "loss": loss_value, "lr": lr,
                          "images_per_s": seen / max(elapsed, 1e-9), "nonfinite_steps": self.nonfinite_steps})
                self._print_progress(epoch + 1, loss_value, lr, seen / max(elapsed, 1e-9))
            running = torch.zeros((), device=self.device)
        self.train_images += seen
        self.train_seconds += time.perf_counter() - start


def _config_differences(saved: dict[str, Any], current: TrainConfig) -> list[str]:
    """``"name old -> new"`` for every trajectory setting that differs (absent = default)."""
    differences = []
    for spec in fields(TrainConfig):
        if spec.name in RESUME_FREE_FIELDS:
            continue
        old, new = saved.get(spec.name, spec.default), getattr(current, spec.name)
        if old != new:
            differences.append(f"{spec.name} {old!r} -> {new!r}")
    return differences


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
