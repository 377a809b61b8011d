"""Everything the CUDA path has to show, in one command on one GPU, inside 8 minutes:

    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR                # ViT-B, 480x640, bf16, CUDA
    PYTHONPATH=. python -m benchmarks.gpu_check --out DIR --quick --device cpu   # same path, tiny, 3 compiles

No network (random weights), torch >= 2.4. Writes ``DIR/gpu_check.json`` after every part
(an interrupted run leaves what it measured) and ``DIR/gpu_check.md``, the block for the
CUDA section of docs/performance.md; ``--doc docs/performance.md`` writes it there too, and
``--render DIR/gpu_check.json --doc docs/performance.md`` does so later from the JSON alone.

Parts, in this order, each under a time guard so the whole run ends within ``--budget-s``
even when compilation is slow (what the budget leaves out is recorded as skipped):

1. eager, bf16 autocast: training throughput (images/s) and ``torch.cuda.max_memory_allocated``
   at batch 16 for gopt, gopt_shallow, vpt_shallow, vpt_deep, lora and fft_early; inference latency
   at batch 1 and throughput at batch 32 for the lower bound (frozen backbone + head), gopt,
   vpt_deep and lora; ``load_adapter`` / ``set_adapter`` times on the device;
2. the same measurements through ``torch.compile``, with compile times: first GoPT's
   inference and its lower bound, and GoPT's training step;
3. end to end: ``benchmarks.run`` on the synthetic world, 30 steps with amp + compile,
   SIGKILLed mid-epoch after its first checkpoint, resumed; its adapter against an
   uninterrupted run's (run side by side);
   then the other variants compiled, as far as the budget goes;
4. the projected wall time of the NYUDv2 recipe (795 images x 60 epochs at batch 64) from
   the measured training throughput (training steps only: no data loading, no evaluation).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import timm
import torch
import torch.nn.functional as F

from gopt_adapter.baselines import build_variant
from gopt_adapter.atomic_files import atomic_write_bytes
from gopt_adapter.cli.bench import synchronize, timed_call

from .markdown import invocation, write_section
from .perf import measure_swaps

TRAIN_VARIANTS = ("gopt", "gopt_shallow", "vpt_shallow", "vpt_deep", "lora", "fft_early")
INFER_VARIANTS = ("lower_bound", "gopt", "vpt_deep", "lora")
# compiled measurements in order of priority: GoPT's own ratio to the lower bound first
COMPILED_FIRST = [("gopt", "infer"), ("lower_bound", "infer"), ("gopt", "train")]
COMPILED_THEN = [("vpt_deep", "infer"), ("lora", "infer"), *((name, "train") for name in TRAIN_VARIANTS[1:])]
DOC_KEY = "gpu-check:cuda"
ROOT = Path(__file__).resolve().parent.parent
NYUDV2 = dict(images=795, epochs=60, batch=64)  # the paper's recipe
E2E_EPOCHS = 3
E2E_GRACE_S = 15  # the end-to-end part may run this far past the budget (the watchdog is at 25 s)


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sizes of the full check, or the tiny ones of ``--quick``."""
    if args.quick:
        return dict(model="vit_base_patch16_224", model_kwargs=dict(embed_dim=32, depth=2, num_heads=2, img_size=64),
                    size=(32, 48), train_batch=2, infer_batch=2, repeats=2, num_classes=5, swap_repeats=5,
                    e2e=dict(batch=2, length=2 * 2, size=32, val_length=2,  # 2 steps per epoch
                             backbone_kwargs=dict(embed_dim=32, depth=2, num_heads=2, patch_size=8, img_size=32)))
    return dict(model="vit_base_patch16_224", model_kwargs={}, size=(480, 640), train_batch=16, infer_batch=32,
                repeats=10, num_classes=40, swap_repeats=50,
                e2e=dict(batch=16, length=16 * 10, size=64, val_length=16))  # 10 steps per epoch: 30 steps


class Budget:
    """Wall-clock budget of the run: parts ask before they start whether they still fit."""

    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds
        self.compile_estimate = {"train": None, "infer": None}

    def left(self) -> float:
        return self.seconds - (time.perf_counter() - self.start)

    def allows(self, needed: float) -> bool:
        return self.left() >= needed

    def needed_for_compile(self, kind: str, default: float) -> float:
        """1.3x the slowest compile of this kind so far; before any, a training step (forward
        and backward graphs) is guessed at 2.5x an inference compile, else ``default``."""
        seen = self.compile_estimate[kind]
        if seen is None and kind == "train" and self.compile_estimate["infer"] is not None:
            return 2.5 * self.compile_estimate["infer"] + 5
        return default if seen is None else 1.3 * seen + 5

    def saw_compile(self, kind: str, seconds: float) -> None:
        self.compile_estimate[kind] = max(seconds, self.compile_estimate[kind] or 0.0)


class Results:
    """The JSON record, written atomically after every part."""

    def __init__(self, path: Path, record: dict[str, Any]) -> None:
        self.path, self.record = path, record
        self.lock = threading.Lock()

    def write(self) -> None:
        with self.lock:
            atomic_write_bytes(self.path, (json.dumps(self.record, indent=2, allow_nan=False) + "\n").encode())


# ------------------------------------------------------------------ measurements
def median_s(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    return statistics.median(timed_call(fn, device) for _ in range(repeats))


def build(name: str, base: torch.nn.Module, num_classes: int, device: torch.device) -> torch.nn.Module:
    """One variant on a copy of the (random-weight) backbone; the same seed every time."""
    torch.manual_seed(0)
    return build_variant(name, copy.deepcopy(base), 1, num_classes).to(device)


def lower_bound(model: torch.nn.Module) -> Callable:
    """The frozen backbone and ``model``'s head without any prompter (what no adapter beats)."""
    def forward(rgb, aux):
        return model.upsample(model.adapter.head(model.backbone_features(rgb)), rgb.shape[-2:])
    return forward


def measure_training(forward: Callable, model: torch.nn.Module, inputs, device: torch.device, repeats: int,
                     autocast) -> dict[str, Any]:
    """Images/s of forward + loss + backward + AdamW step, and the peak memory of one step.

    The first step (compilation, when ``forward`` is compiled) is timed apart as ``first_step_s``.
    """
    rgb, aux, target = inputs
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

    def step():
        with autocast:
            logits = forward(rgb, aux)
        F.cross_entropy(logits.float(), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    first = timed_call(step, device)
    step()  # warm-up (optimizer state exists from here)
    seconds = median_s(step, device, repeats)
    record = {"first_step_s": first, "step_ms": 1e3 * seconds, "images_per_s": rgb.shape[0] / seconds}
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        step()
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        record.update(peak_memory_bytes=peak, peak_above_resident_bytes=peak - resident)
    return record


def measure_inference(forward: Callable, model: torch.nn.Module, one, many, device: torch.device, repeats: int,
                      autocast, budget: Budget | None = None) -> dict[str, Any]:
    """Latency at batch 1 (ms) and throughput at the large batch (images/s), bf16 autocast.

    With ``budget``, the large batch (a second compilation when compiled) is skipped when
    fewer seconds are left than 1.3x the first call at batch 1 took.
    """
    model.eval()
    record: dict[str, Any] = {}
    with torch.inference_mode(), autocast:
        for key, (rgb, aux) in (("b1", one), ("bN", many)):
            if key == "bN" and budget is not None and not budget.allows(1.3 * record["b1"]["first_call_s"] + 5):
                record["bN"] = {"skipped": "time budget"}
                continue
            first = timed_call(lambda: forward(rgb, aux), device)
            forward(rgb, aux)
            seconds = median_s(lambda: forward(rgb, aux), device, repeats)
            record[key] = {"batch": rgb.shape[0], "first_call_s": first, "ms": 1e3 * seconds,
                           "images_per_s": rgb.shape[0] / seconds}
    return record


def release(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ------------------------------------------------------------------ end to end
class StallingDataset(torch.utils.data.Dataset):
    """``dataset`` that blocks for good at its ``after + 1``-th read: the run then sits inside
    an epoch, its last checkpoint behind it, until it is killed (same samples, same RNG)."""

    def __init__(self, dataset, after: int) -> None:
        self.dataset, self.after, self.reads = dataset, after, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        self.reads += 1
        if self.reads > self.after:
            time.sleep(900)
        return self.dataset[index]

    def __getattr__(self, name):  # class_names, aux_channels, ...
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


def e2e_worker(argv: list[str]) -> int:
    """``--e2e-worker READS -- RUN_ARGS``: ``benchmarks.run`` whose training set stalls after READS reads."""
    from gopt_adapter.train import run as training_run

    from . import run as runner

    after, run_args = int(argv[0]), argv[argv.index("--") + 1:]
    build_datasets = training_run.build_datasets

    def stalling(config, defaults=None):
        train, val = build_datasets(config, defaults)
        return StallingDataset(train, after), val

    training_run.build_datasets = stalling
    return runner.main(run_args)


def e2e_run_args(out: Path, device: torch.device, backend: str, e2e: dict[str, int]) -> list[str]:
    sets = {"train.amp": "true", "train.compile": "true", "train.compile_backend": json.dumps(backend),
            "train.epochs": str(E2E_EPOCHS), "train.batch_size": str(e2e["batch"]), "train.log_every": "1",
            "train.progress": "false", "train.num_workers": "0", "dataset_options.length": str(e2e["length"]),
            "dataset_options.size": str(e2e["size"]), "val_options.length": str(e2e["val_length"]),
            "transforms.crop_size": json.dumps([e2e["size"], e2e["size"]])}
    if "backbone_kwargs" in e2e:  # else the synthetic config's (ViT, width 64, depth 4, patch 8)
        sets["backbone_kwargs"] = json.dumps(e2e["backbone_kwargs"])
    args = ["--dataset", "synthetic", "--out", str(out), "--device", str(device)]
    for key, value in sets.items():
        args += ["--set", f"{key}={value}"]
    return args


def logged_steps(log: Path) -> list[int]:
    steps = []
    if log.exists():
        for line in log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("event") == "train":
                steps.append(record["step"])
    return steps


def end_to_end(out: Path, device: torch.device, backend: str, e2e: dict[str, int], budget: Budget) -> dict[str, Any]:
    """Uninterrupted run and killed-then-resumed run side by side; their adapters compared."""
    from safetensors.torch import load_file

    from gopt_adapter.train.run import ADAPTER_NAME

    steps_per_epoch = e2e["length"] // e2e["batch"]
    kill_after = steps_per_epoch + 1  # one step into epoch 2: work after the checkpoint is lost
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    dirs = {name: out / "e2e" / name for name in ("straight", "killed")}
    procs = {}
    for name, folder in dirs.items():
        folder.mkdir(parents=True, exist_ok=True)
        args = e2e_run_args(folder, device, backend, e2e)
        command = [sys.executable, "-m", "benchmarks.run", *args]
        if name == "killed":
            command = [sys.executable, "-m", "benchmarks.gpu_check", "--e2e-worker",
                       str(kill_after * e2e["batch"]), "--", *args]
        procs[name] = subprocess.Popen(command, cwd=ROOT, env=env, stdout=open(folder / "stdout.txt", "w"),
                                       stderr=open(folder / "stderr.txt", "w"))
    record: dict[str, Any] = {"steps": steps_per_epoch * E2E_EPOCHS, "batch": e2e["batch"], "backend": backend}
    start = time.perf_counter()
    killed = procs["killed"]
    while not (max(logged_steps(dirs["killed"] / "log.jsonl"), default=0) >= kill_after
               and (dirs["killed"] / "checkpoint.pt").exists()):
        if killed.poll() is not None or not budget.allows(-E2E_GRACE_S):  # required: may overrun a little
            for proc in procs.values():
                proc.kill()
            return {**record, "error": f"the run to kill ended (rc {killed.poll()}) or the budget ran out first; "
                                       f"see {dirs['killed']}/stderr.txt"}
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    record["killed_after_step"] = max(logged_steps(dirs["killed"] / "log.jsonl"))
    checkpoint = torch.load(dirs["killed"] / "checkpoint.pt", map_location="cpu", weights_only=True)
    record["checkpoint_step"] = checkpoint["step"]
    record["until_kill_s"] = time.perf_counter() - start
    try:
        resumed = subprocess.run([sys.executable, "-m", "benchmarks.run", "--resume",
                                  *e2e_run_args(dirs["killed"], device, backend, e2e)],
                                 cwd=ROOT, env=env, capture_output=True, text=True,
                                 timeout=max(5.0, budget.left() + E2E_GRACE_S))
        straight_rc = procs["straight"].wait(timeout=max(5.0, budget.left() + E2E_GRACE_S))
    except subprocess.TimeoutExpired:
        procs["straight"].kill()
        return {**record, "error": "the resumed or the uninterrupted run did not end within the budget"}
    record.update(resume_rc=resumed.returncode, straight_rc=straight_rc, total_s=time.perf_counter() - start)
    if resumed.returncode or straight_rc:
        return {**record, "error": (resumed.stderr or "")[-2000:] or f"see {dirs['straight']}/stderr.txt"}
    a, b = (load_file(str(dirs[name] / ADAPTER_NAME)) for name in ("straight", "killed"))
    record["same_tensor_names"] = set(a) == set(b)
    record["bitwise_equal"] = set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    record["max_abs_diff"] = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b), default=None)
    results = [json.loads((dirs[name] / "results.json").read_text()) for name in ("straight", "killed")]
    record["metrics_equal"] = results[0]["metrics"] == results[1]["metrics"]
    record["miou"] = results[1]["metrics"].get("miou")
    events = [json.loads(line).get("event") for line in (dirs["killed"] / "log.jsonl").read_text().splitlines()]
    record["resumed"] = "resume" in events
    return record


# ------------------------------------------------------------------ the run
def measure(args: argparse.Namespace, argv) -> dict[str, Any]:
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but CUDA is not available (use --quick --device cpu)")
    sizes = settings(args)
    backend = args.compile_backend or ("inductor" if cuda else "eager")
    budget = Budget(args.budget_s or (70.0 if args.quick else 400.0))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16)
    record: dict[str, Any] = {
        "command": invocation("benchmarks.gpu_check", argv),
        "setting": {"model": sizes["model"], "model_kwargs": sizes["model_kwargs"], "size": list(sizes["size"]),
                    "train_batch": sizes["train_batch"], "infer_batch": sizes["infer_batch"],
                    "repeats": sizes["repeats"], "num_classes": sizes["num_classes"], "dtype": "bf16 autocast",
                    "device": str(device), "gpu": torch.cuda.get_device_name(device) if cuda else None,
                    "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
                    "compile_backend": backend, "quick": args.quick, "budget_s": budget.seconds,
                    "date": time.strftime("%Y-%m-%d")},
        "training": {}, "inference": {}, "compile_s": {}, "skipped": [], "parts_s": {},
    }
    results = Results(out / "gpu_check.json", record)
    watchdog = threading.Timer(budget.seconds + 25, _abort, args=(results,))  # a compile that never returns
    watchdog.daemon = True
    watchdog.start()
    base = timm.create_model(sizes["model"], pretrained=False, num_classes=0, dynamic_img_size=True,
                             **sizes["model_kwargs"]).eval()
    generator = torch.Generator().manual_seed(0)

    def batch(n: int, with_target: bool = False):
        tensors = [torch.randn(n, 3, *sizes["size"], generator=generator),
                   torch.randn(n, 1, *sizes["size"], generator=generator)]
        if with_target:
            tensors.append(torch.randint(0, sizes["num_classes"], (n, *sizes["size"]), generator=generator))
        return [t.to(device) for t in tensors]

    train_inputs, one, many = batch(sizes["train_batch"], True), batch(1), batch(sizes["infer_batch"])
    repeats = sizes["repeats"]

    def part(name: str, fn: Callable[[], None]) -> None:
        start = time.perf_counter()
        fn()
        record["parts_s"][name] = time.perf_counter() - start
        results.write()

    def skip(what: str) -> None:
        record["skipped"].append(what)
        results.write()

    def eager() -> None:
        for name in dict.fromkeys(TRAIN_VARIANTS + INFER_VARIANTS[1:]):
            if not budget.allows(15):
                skip(f"{name} eager")
                continue
            try:
                model = build(name, base, sizes["num_classes"], device)
            except ImportError as exc:  # lora needs peft
                skip(f"{name}: {exc}")
                continue
            measurements = [("training", name, lambda: measure_training(
                model, model, train_inputs, device, repeats, autocast))] if name in TRAIN_VARIANTS else []
            if name in INFER_VARIANTS:
                measurements.append(("inference", name, lambda: measure_inference(
                    model, model, one, many, device, repeats, autocast)))
            if name == "gopt":
                measurements.append(("inference", "lower_bound", lambda: measure_inference(
                    lower_bound(model), model, one, many, device, repeats, autocast)))
            for table, row, run in measurements:
                try:
                    record[table].setdefault(row, {})["eager"] = run()
                except Exception as exc:  # out of memory, say: recorded, the check goes on
                    record[table].setdefault(row, {})["eager"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            if name == "gopt":
                try:  # never run on a GPU before this check
                    record["swap"] = measure_swaps([SimpleNamespace(name="gopt", model=model)],
                                                   sizes["swap_repeats"], device=device)
                except Exception as exc:
                    record["swap"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
            results.write()
            model = measurements = None  # freed before the next variant is built
            release(device)

    def compiled(order: list[tuple[str, str]]) -> None:
        default_train, default_infer = (240.0, 120.0) if cuda else (10.0, 6.0)
        for name, kind in order:
            needed = budget.needed_for_compile(kind, default_train if kind == "train" else default_infer)
            if not budget.allows(needed):
                skip(f"{name} compiled {kind}: time budget ({budget.left():.0f} s left, ~{needed:.0f} s needed)")
                continue
            try:
                model = build("gopt" if name == "lower_bound" else name, base, sizes["num_classes"], device)
            except ImportError as exc:
                skip(f"{name}: {exc}")
                continue
            forward = torch.compile(lower_bound(model) if name == "lower_bound" else model, backend=backend)
            table = record["training" if kind == "train" else "inference"].setdefault(name, {})
            start = time.perf_counter()
            try:
                if kind == "train":
                    table["compiled"] = measure_training(forward, model, train_inputs, device, repeats, autocast)
                    compile_s = table["compiled"]["first_step_s"]
                else:
                    table["compiled"] = measure_inference(forward, model, one, many, device, repeats, autocast,
                                                          budget)
                    compile_s = table["compiled"]["b1"]["first_call_s"]
            except Exception as exc:  # a compiler failure is a finding, not the end of the check
                table["compiled"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                compile_s = time.perf_counter() - start
            budget.saw_compile(kind, compile_s)
            record["compile_s"][f"{name} {kind}"] = compile_s
            results.write()
            del model, forward
            release(device)

    def e2e() -> None:
        if not budget.allows(60 if cuda else 20):
            skip("end to end: time budget")
            return
        try:
            record["e2e"] = end_to_end(out, device, backend, sizes["e2e"], budget)
        except Exception as exc:
            record["e2e"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}

    part("eager", eager)
    part("compiled gopt", lambda: compiled(COMPILED_FIRST))
    part("e2e", e2e)
    if args.quick:  # the same code as the first three: --quick checks the path, not the numbers
        for name, kind in COMPILED_THEN:
            skip(f"{name} compiled {kind}: --quick compiles only {', '.join(n for n, _ in COMPILED_FIRST)}")
    else:
        part("compiled others", lambda: compiled(COMPILED_THEN))
    record["projection"] = projection(record["training"])
    record["total_s"] = time.perf_counter() - budget.start
    watchdog.cancel()
    results.write()
    return record


def _abort(results: Results) -> None:
    results.record["aborted"] = "hard time limit: a part did not return"
    results.write()
    os._exit(3)


def projection(training: dict[str, Any]) -> dict[str, Any]:
    """Hours of training steps for the NYUDv2 recipe (drop_last: 12 steps of 64 per epoch)."""
    images = NYUDV2["images"] // NYUDV2["batch"] * NYUDV2["batch"] * NYUDV2["epochs"]
    rows = {}
    for name, modes in training.items():
        for mode, measured in modes.items():
            if "images_per_s" in measured:
                rows[f"{name} {mode}"] = images / measured["images_per_s"] / 3600
    return {"recipe": NYUDV2, "images": images, "hours": rows}


# ------------------------------------------------------------------ the report
def _cell(record: dict[str, Any] | None, key: str, fmt: str) -> str:
    if not record:
        return "-"
    if "skipped" in record or "error" in record:
        return "skipped" if "skipped" in record else "failed"
    return format(record[key], fmt) if record.get(key) is not None else "-"


def render(record: dict[str, Any]) -> str:
    """The docs block: setting line, training table, inference table, swaps, end to end, projection."""
    s = record["setting"]
    lines = [f"`{s['model']}` (random weights), {s['size'][0]}x{s['size'][1]}, {s['device']}"
             f"{' (' + s['gpu'] + ')' if s.get('gpu') else ''}, {s['dtype']}, torch {s['torch']}, timm {s['timm']}, "
             f"compile backend `{s['compile_backend']}`, median of {s['repeats']}, measured {s['date']}"
             f"{' (--quick)' if s['quick'] else ''}", ""]
    mib = lambda m, k: "-" if not m or k not in m else f"{m[k] / 2 ** 20:,.0f}"  # noqa: E731
    lines += [f"Training at batch {s['train_batch']} (forward, loss, backward, AdamW):", "",
              "| variant | eager img/s | eager peak MiB | compiled img/s | compiled peak MiB | compile s |",
              "|---|---:|---:|---:|---:|---:|"]
    for name, modes in record["training"].items():
        e, c = modes.get("eager"), modes.get("compiled")
        lines.append(f"| {name} | {_cell(e, 'images_per_s', '.1f')} | {mib(e, 'peak_memory_bytes')} | "
                     f"{_cell(c, 'images_per_s', '.1f')} | {mib(c, 'peak_memory_bytes')} | "
                     f"{_cell(c, 'first_step_s', '.0f')} |")
    lower = record["inference"].get("lower_bound", {})
    lines += ["", f"Inference, latency at batch 1 (ratio to the lower bound) and throughput at batch "
                  f"{s['infer_batch']}:", "",
              "| variant | eager ms | compiled ms | eager img/s | compiled img/s |", "|---|---:|---:|---:|---:|"]
    for name, modes in record["inference"].items():
        cells = []
        for mode in ("eager", "compiled"):
            b1, base = modes.get(mode, {}).get("b1"), lower.get(mode, {}).get("b1")
            ratio = f" ({b1['ms'] / base['ms']:.3f})" if b1 and base and "ms" in b1 and "ms" in base else ""
            cells.append(_cell(b1, "ms", ".2f") + ratio)
        cells += [_cell(modes.get(mode, {}).get("bN"), "images_per_s", ".1f") for mode in ("eager", "compiled")]
        lines.append(f"| {name.replace('_', ' ')} | " + " | ".join(cells) + " |")
    swap = record.get("swap")
    if swap and "error" in swap:
        lines += ["", f"Swap on the device: failed: {swap['error']}"]
    elif swap:
        lines += ["", f"Swap on the device: `load_adapter` {swap['load_adapter_ms']:.2f} ms, "
                      f"`set_adapter` {swap['set_adapter_ms']:.3f} ms."]
    e2e = record.get("e2e")
    if e2e:
        if "error" in e2e:
            lines += ["", f"End to end: failed: {e2e['error'].splitlines()[-1] if e2e['error'] else ''}"]
        else:
            lines += ["", f"End to end (`benchmarks.run`, synthetic, {e2e['steps']} steps of {e2e['batch']}, amp + "
                          f"compile): SIGKILLed after step {e2e['killed_after_step']} (checkpoint at step "
                          f"{e2e['checkpoint_step']}), resumed; adapter "
                          f"{'bitwise equal to' if e2e['bitwise_equal'] else 'NOT bitwise equal to'} the "
                          f"uninterrupted run's (max abs difference {e2e['max_abs_diff']:.3g}), metrics "
                          f"{'equal' if e2e['metrics_equal'] else 'differ'}; {e2e['total_s']:.0f} s."]
    hours = record.get("projection", {}).get("hours", {})
    if hours:
        recipe = record["projection"]["recipe"]
        lines += ["", f"Projected NYUDv2 recipe ({recipe['images']} images x {recipe['epochs']} epochs at batch "
                      f"{recipe['batch']}, training steps only): " +
                  ", ".join(f"{name} {value:.2f} h" for name, value in hours.items()) + "."]
    failures = [f"{name} {mode}: {m['error']}" for table in ("training", "inference")
                for name, modes in record[table].items() for mode, m in modes.items() if "error" in m]
    if failures:
        lines += ["", "Failed: " + "; ".join(failures)]
    if record.get("skipped"):
        lines += ["", "Skipped (time budget or missing package): " + "; ".join(record["skipped"]) + "."]
    if record.get("aborted"):
        lines += ["", f"Aborted: {record['aborted']}."]
    total = record.get("total_s")
    if total is not None:
        lines += ["", f"Whole check: {total:.0f} s of a {s['budget_s']:.0f} s budget."]
    return "\n".join(lines) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="folder for gpu_check.json, gpu_check.md and the end-to-end runs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny ViT and sizes: the same code path in seconds")
    parser.add_argument("--compile-backend", help="torch.compile backend (default: inductor on CUDA; on the CPU eager, "
                        "Dynamo capture only: Inductor's C++ build takes minutes there)")
    parser.add_argument("--budget-s", type=float, help="wall-clock budget of the measuring (default 400 s, --quick 70 s); "
                        "a part still running 25 s past it ends the run")
    parser.add_argument("--doc", help="also write the block into this Markdown file (docs/performance.md)")
    parser.add_argument("--render", help="write the block of an existing gpu_check.json (no measuring)")
    args = parser.parse_args(argv)
    if not (args.out or args.render):
        parser.error("--out DIR is required (or --render JSON)")
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--e2e-worker"]:
        return e2e_worker(argv[1:])
    args = parse_args(argv)
    if args.render:
        record = json.loads(Path(args.render).read_text())
    else:
        record = measure(args, argv)
    text = render(record)
    if args.out:
        atomic_write_bytes(Path(args.out) / "gpu_check.md", text.encode())
    print(text)
    if args.doc:
        write_section(args.doc, DOC_KEY, record["command"], text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
