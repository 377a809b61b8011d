"""Training and evaluation loop for any ``model(rgb, aux) -> logits`` segmenter.

Trains exactly the parameters that require grad (AdamW, polynomial decay with linear
warmup, gradient accumulation and clipping, cross-entropy with ignore value 255); on CUDA
with bf16 autocast and optional ``torch.compile``; under ``torchrun`` with DDP (nccl on CUDA,
gloo on CPU). Rank 0 alone writes the JSONL log and an atomic checkpoint after every epoch;
``resume=True`` continues from it, reproducing the uninterrupted run exactly (data order,
Gumbel noise and transforms all draw from RNG states stored in the checkpoint).
"""

from __future__ import annotations

import io
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from .adapter_io import atomic_write_bytes
from .metrics import SegMetrics

IGNORE_INDEX = 255
CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"


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
    amp: bool = True  # bf16 autocast, CUDA only
    compile: bool = False
    grad_checkpointing: bool = False
    num_workers: int = 0
    seed: int = 0
    eval_every: int = 1  # epochs; 0 = only at the end
    eval_window: int | None = None  # sliding-window size for large images (None = whole image)
    eval_stride: int | None = None
    log_every: int = 10  # optimizer steps
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accum", "log_every"):
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
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} is not divisible by grad_accum {self.grad_accum}")
        if self.eval_stride is not None and self.eval_window is None:
            raise ValueError("eval_stride needs eval_window")


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


def default_device(ctx: Dist) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if torch.cuda.is_available() else torch.device("cpu")


# ------------------------------------------------------------------ schedule & state
def poly_lr_factor(step: int, total_steps: int, warmup_steps: int, power: float) -> float:
    """Linear warmup to 1, then ``(1 - progress) ** power`` down to 0 at ``total_steps``."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 1.0 - progress) ** power


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters and the buffers of the modules that own them (e.g. BatchNorm stats)."""
    state = {}
    for module_name, module in model.named_modules():
        own = list(module.named_parameters(recurse=False))
        if not any(p.requires_grad for _, p in own):
            continue
        prefix = f"{module_name}." if module_name else ""
        for name, tensor in [*own, *module.named_buffers(recurse=False)]:
            if not isinstance(tensor, nn.Parameter) or tensor.requires_grad:
                state[prefix + name] = tensor.detach().clone()
    return state


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, gstate, internal = state["python"]
    random.setstate((version, tuple(gstate), internal))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ------------------------------------------------------------------ evaluation
def sliding_window_logits(model: Callable, rgb: torch.Tensor, aux: torch.Tensor, num_classes: int,
                          window: int, stride: int | None = None) -> torch.Tensor:
    """Average of the logits of overlapping ``window``-sized crops covering the image."""
    stride = stride or window
    height, width = rgb.shape[-2:]
    if height <= window and width <= window:
        return model(rgb, aux)
    logits = rgb.new_zeros(rgb.shape[0], num_classes, height, width)
    counts = rgb.new_zeros(1, 1, height, width)
    rows = _window_starts(height, window, stride)
    cols = _window_starts(width, window, stride)
    for top in rows:
        for left in cols:
            crop = (..., slice(top, top + window), slice(left, left + window))
            logits[crop] += model(rgb[crop], aux[crop]).float()
            counts[crop] += 1
    return logits / counts


def _window_starts(size: int, window: int, stride: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] + window < size:
        starts.append(size - window)  # last window flush with the border
    return starts


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, num_classes: int, device: torch.device | str = "cpu",
             ctx: Dist = Dist(), window: int | None = None, stride: int | None = None, amp: bool = True,
             progress: bool = False) -> dict[str, Any]:
    """Full-size evaluation (batch 1, images may differ in size), summed over all ranks."""
    was_training = model.training
    model.eval()
    shard = Subset(dataset, range(ctx.rank, len(dataset), ctx.world_size))  # no padding duplicates
    loader = DataLoader(shard, batch_size=1, shuffle=False, num_workers=0)
    metrics = SegMetrics(num_classes, IGNORE_INDEX, device=device)
    autocast = _autocast(device, amp)
    for batch in _progress(loader, "eval", progress and ctx.is_main):
        rgb, aux = batch["rgb"].to(device), batch["aux"].to(device)
        with autocast:
            if window:
                logits = sliding_window_logits(model, rgb, aux, num_classes, window, stride)
            else:
                logits = model(rgb, aux)
        metrics.update(logits.argmax(1), batch["label"].to(device))
    metrics.sync()
    model.train(was_training)
    return metrics.compute()


def _autocast(device: torch.device | str, amp: bool):
    device = torch.device(device)
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp and device.type == "cuda")


def _progress(iterable: Iterable, desc: str, enabled: bool, total: int | None = None):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr, dynamic_ncols=True)


# ------------------------------------------------------------------ training
class Trainer:
    """Trains ``model`` on ``train_set``; evaluates on ``val_set``; checkpoints to ``out_dir``."""

    def __init__(self, model: nn.Module, train_set: Dataset, num_classes: int, config: TrainConfig,
                 out_dir: str | os.PathLike, val_set: Dataset | None = None, device: torch.device | str | None = None,
                 ctx: Dist | None = None) -> None:
        self.ctx = ctx or init_distributed()
        self.device = torch.device(device) if device is not None else default_device(self.ctx)
        self.config = config
        self.num_classes = num_classes
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
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no parameter that requires grad: nothing to train")
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
        self.forward = self._build_forward(model)
        self.epoch, self.step = 0, 0
        self.train_images, self.train_seconds = 0, 0.0  # over all ranks, for throughput
        if self.ctx.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

    def _build_forward(self, model: nn.Module) -> nn.Module:
        forward = model
        if self.ctx.world_size > 1:
            forward = nn.parallel.DistributedDataParallel(
                model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.config.compile:
            forward = torch.compile(forward)
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
        }
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(self.checkpoint_path, buffer.getvalue())

    def load_checkpoint(self) -> bool:
        """Restores the last checkpoint if there is one; returns whether it did."""
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.device, weights_only=True)
        missing = self.model.load_state_dict(state["model"], strict=False)
        if missing.unexpected_keys:
            raise ValueError(f"{self.checkpoint_path}: does not fit this model (unexpected {missing.unexpected_keys[:5]})")
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.epoch, self.step = state["epoch"], state["step"]
        _set_rng_state({**state["rng"], "torch": state["rng"]["torch"].cpu()})
        return True

    def sync_buffers(self) -> None:
        """Gives every rank rank 0's buffers (BatchNorm statistics drift apart under DDP), so all
        ranks evaluate, and rank 0 saves, one and the same model."""
        if self.ctx.world_size > 1:
            for buffer in self.model.buffers():
                dist.broadcast(buffer, src=0)

    # ------------------------------------------------------------------- logging
    def log(self, record: dict[str, Any]) -> None:
        if self.ctx.is_main:
            with open(self.out_dir / LOG_NAME, "a") as handle:
                handle.write(json.dumps(record) + "\n")

    # ---------------------------------------------------------------------- loop
    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Runs the remaining epochs; returns the last evaluation (empty without ``val_set``)."""
        if resume and self.load_checkpoint():
            self.log({"event": "resume", "epoch": self.epoch, "step": self.step})
        config, metrics = self.config, {}
        for epoch in range(self.epoch, config.epochs):
            self.train_epoch(epoch)
            self.epoch = epoch + 1
            last = self.epoch == config.epochs
            if self.val_set is not None and (last or (config.eval_every and self.epoch % config.eval_every == 0)):
                metrics = self.evaluate()
                self.log({"event": "eval", "epoch": self.epoch, **_scalars(metrics)})
            self.sync_buffers()
            self.save_checkpoint()
        return metrics

    def evaluate(self) -> dict[str, Any]:
        self.sync_buffers()
        config = self.config
        return evaluate(self.model, self.val_set, self.num_classes, self.device, self.ctx,
                        config.eval_window, config.eval_stride, config.amp, config.progress)

    def train_epoch(self, epoch: int) -> None:
        config = self.config
        self.model.train()
        self.sampler.set_epoch(epoch)
        autocast = _autocast(self.device, config.amp)
        params = [group["params"] for group in self.optimizer.param_groups]
        start, seen, running = time.perf_counter(), 0, 0.0
        batches = _progress(self.loader, f"epoch {epoch + 1}/{config.epochs}", config.progress and self.ctx.is_main)
        for index, batch in enumerate(batches):
            if index >= self.steps_per_epoch * config.grad_accum:
                break
            rgb = batch["rgb"].to(self.device, non_blocking=True)
            aux = batch["aux"].to(self.device, non_blocking=True)
            label = batch["label"].to(self.device, non_blocking=True)
            with autocast:
                logits = self.forward(rgb, aux)
            loss = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX) / config.grad_accum
            loss.backward()
            running += float(loss.detach())
            seen += rgb.shape[0] * self.ctx.world_size
            if (index + 1) % config.grad_accum:
                continue
            if config.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_([p for group in params for p in group], config.clip_grad_norm)
            lr = self.optimizer.param_groups[0]["lr"]  # the rate this step used
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            self.step += 1
            if self.step % config.log_every == 0 or self.step % self.steps_per_epoch == 0:
                elapsed = time.perf_counter() - start
                self.log({"event": "train", "epoch": epoch + 1, "step": self.step, "loss": running,
                          "lr": lr, "images_per_s": seen / max(elapsed, 1e-9)})
            running = 0.0
        self.train_images += seen
        self.train_seconds += time.perf_counter() - start


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
