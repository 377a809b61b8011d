"""ONNX export of a segmenter with its active adapter, and the parity check against PyTorch.

GoPT's prompts depend on the input, so unlike LoRA they cannot be merged into the backbone:
the whole segmenter (frozen blocks, prompters, head, upsampling) goes into one graph, with
inputs ``rgb [B, 3, H, W]`` and ``aux [B, C_aux, H, W]`` and output ``logits [B, K, H, W]``.
The batch axis is always dynamic; ``H`` and ``W`` are dynamic with ``dynamic_size=True``.

An adapter with an aux-missing mode (trained with ``aux_dropout > 0``) keeps it in the graph:
``aux_missing_input=True`` adds a third input ``aux_missing`` (bool ``[B]``; flagged samples use
the stand-in tokens and logit offsets, exactly as ``segmenter(rgb, aux, aux_missing=...)``), and
``rgb_only=True`` exports a graph whose only input is ``rgb`` (``segmenter(rgb)``), for a robot or
a car whose second sensor may drop out. Needs the ``export`` extra (``pip install gopt-adapter[export]``: onnx, onnxscript,
onnxruntime for the check).
"""

from __future__ import annotations

import copy
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .atomic_files import atomic_write_bytes
from .config import GoptConfig
from .gopt_segmenter import GoptSegmenter
from .segmenter import SegmenterBase

INPUT_NAMES = ("rgb", "aux")
MISSING_INPUT = "aux_missing"
OUTPUT_NAME = "logits"
#: Largest ``|onnxruntime - PyTorch|`` over fp32 logits that counts as parity.
PARITY_TOLERANCE = 1e-4
#: An fp16 graph against the fp32 PyTorch model: the largest difference over the logits, divided
#: by the largest absolute fp32 logit, that counts as parity (fp16 keeps 11 significant bits, about
#: 5e-4 relative per rounding; the blocks add up a few dozen roundings).
FP16_RELATIVE_TOLERANCE = 5e-3
#: Graph precisions: fp32, or fp16 (weights and activations; checked against the fp32 model).
EXPORT_DTYPES = (torch.float32, torch.float16)
#: Example batch of the traced graph; 2, not 1: ``torch.export`` fixes axes of size 1.
TRACE_BATCH = 2


def require_module(module: str) -> None:
    """Raises ``ImportError`` naming the ``export`` extra when ``module`` is not installed."""
    try:
        __import__(module)
    except ImportError:
        raise ImportError(f"ONNX export needs {module}: pip install 'gopt-adapter[export]' "
                          "(onnx, onnxscript, onnxruntime)") from None


def _check_size(image_size: tuple[int, int]) -> tuple[int, int]:
    size = tuple(image_size) if isinstance(image_size, (tuple, list)) else ()
    if len(size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size):
        raise ValueError(f"image_size must be two positive integers (H, W), got {image_size!r}")
    return size  # type: ignore[return-value]


class _WithMissingFlags(nn.Module):
    """``(rgb, aux, aux_missing) -> logits``: the graph of ``aux_missing_input=True``."""

    def __init__(self, segmenter: GoptSegmenter) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.training = False  # traced with the segmenter in eval mode; the exporter reads this flag

    def forward(self, rgb: torch.Tensor, aux: torch.Tensor, aux_missing: torch.Tensor) -> torch.Tensor:
        return self.segmenter(rgb, aux, aux_missing=aux_missing)


class _RgbOnly(nn.Module):
    """``rgb -> logits`` in the aux-missing mode: the graph of ``rgb_only=True``."""

    def __init__(self, segmenter: GoptSegmenter) -> None:
        super().__init__()
        self.segmenter = segmenter
        self.training = False  # traced with the segmenter in eval mode; the exporter reads this flag

    def forward(self, rgb: torch.Tensor) -> torch.Tensor:
        return self.segmenter(rgb)


def check_missing_mode(config: GoptConfig | None, flag: str, adapter: str) -> None:
    """Raises ``ValueError`` naming ``flag`` and ``adapter`` unless ``config`` (a GoPT adapter's;
    ``None`` for any other adapter) has an aux-missing mode. ``gopt export`` asks it of the
    adapter file before building the backbone, :func:`export_onnx` of the active adapter."""
    if not (config is not None and config.has_missing_mode):
        raise ValueError(f"{flag} needs an adapter with an aux-missing mode (a GoPT adapter trained with "
                         f"aux_dropout > 0); {adapter} has none")


@contextmanager
def _eval_mode(segmenter: SegmenterBase) -> Iterator[None]:
    training = segmenter.training
    segmenter.eval()
    try:
        yield
    finally:
        segmenter.train(training)


def example_inputs(segmenter: SegmenterBase, image_size: tuple[int, int], batch: int = TRACE_BATCH,
                   seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``rgb [batch, 3, H, W]`` and ``aux [batch, C_aux, H, W]`` on the segmenter's device and dtype."""
    parameter = next(segmenter.parameters())
    generator = torch.Generator().manual_seed(seed)
    height, width = image_size
    rgb = torch.randn(batch, segmenter.spec.in_chans, height, width, generator=generator)
    aux = torch.randn(batch, segmenter.config.aux_channels, height, width, generator=generator)
    return rgb.to(parameter.device, parameter.dtype), aux.to(parameter.device, parameter.dtype)


def check_export_dtype(dtype: torch.dtype) -> None:
    """Raises ``ValueError`` unless ``dtype`` is one of :data:`EXPORT_DTYPES`, with the reason for bf16."""
    if dtype == torch.bfloat16:
        raise ValueError("bf16 is not exported: onnxruntime's CPU provider has no bf16 kernels for the graph's "
                         "operators, so the graph could be neither run nor checked; export fp16 or fp32")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be torch.float32 or torch.float16, got {dtype}")


def export_onnx(segmenter: SegmenterBase, path: str | os.PathLike, image_size: tuple[int, int],
                dynamic_size: bool = False, opset: int | None = None, aux_missing_input: bool = False,
                rgb_only: bool = False, dtype: torch.dtype = torch.float32) -> Path:
    """Writes the active adapter's segmenter, in eval mode, as an ONNX model at ``path``.

    ``image_size`` ``(H, W)`` is the traced size (and the only one the graph takes unless
    ``dynamic_size``); with ``dynamic_size=True`` (backbones created with
    ``dynamic_img_size=True`` only) ``H`` and ``W`` become dynamic axes. ``opset``: the ONNX
    opset (default: the exporter's). ``aux_missing_input`` adds the input ``aux_missing`` (bool
    ``[B]``), ``rgb_only`` leaves ``rgb`` the only input; both need an adapter with an
    aux-missing mode (``ValueError`` otherwise, before anything is traced). ``dtype=torch.float16``
    writes an fp16 graph (weights, inputs and logits; a copy of the segmenter is converted, the
    segmenter itself is left as it is); bf16 is refused (see :func:`check_export_dtype`). The file
    is written atomically; the segmenter's mode is restored afterwards. Check the result with
    :func:`onnx_max_difference` (fp16: ``relative=True`` against :data:`FP16_RELATIVE_TOLERANCE`).
    """
    if not isinstance(segmenter, SegmenterBase):
        raise TypeError(f"export_onnx needs a segmenter (apply_gopt or a baseline), got {type(segmenter).__name__}")
    check_export_dtype(dtype)
    if aux_missing_input and rgb_only:
        raise ValueError("aux_missing_input and rgb_only choose different graphs; give one of them")
    if aux_missing_input or rgb_only:
        check_missing_mode(segmenter.config if isinstance(segmenter, GoptSegmenter) else None,
                           "aux_missing_input" if aux_missing_input else "rgb_only",
                           f"adapter {segmenter.active_adapter!r}")
    size = _check_size(image_size)
    spec = segmenter.spec
    spec.check_image_size(*size)
    if dynamic_size and not spec.dynamic_img_size:
        raise ValueError(f"{spec.class_name} has a fixed input size {spec.img_size}: dynamic_size=True needs a "
                         "backbone created with dynamic_img_size=True")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 18):
        raise ValueError(f"opset must be an integer >= 18 (the exporter's lowest), got {opset!r}")
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name such as model.onnx")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    for module in ("onnx", "onnxscript"):
        require_module(module)

    traced = segmenter if dtype == torch.float32 else copy.deepcopy(segmenter).to(dtype)
    rgb, aux = example_inputs(traced, size)
    axes: dict[int, object] = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        axes.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    model: nn.Module = traced
    inputs: tuple[torch.Tensor, ...] = (rgb, aux)
    names, shapes = list(INPUT_NAMES), [axes, axes]
    if aux_missing_input:  # one sample of each kind in the traced batch, so no branch is specialised away
        model, inputs = _WithMissingFlags(traced), (rgb, aux, torch.arange(rgb.shape[0], device=rgb.device) % 2 == 0)
        names, shapes = [*INPUT_NAMES, MISSING_INPUT], [axes, axes, {0: torch.export.Dim.DYNAMIC}]
    elif rgb_only:
        model, inputs, names, shapes = _RgbOnly(traced), (rgb,), ["rgb"], [axes]
    with _eval_mode(traced), torch.no_grad():
        program = torch.onnx.export(model, inputs, input_names=names, output_names=[OUTPUT_NAME],
                                    dynamic_shapes=tuple(shapes), opset_version=opset, dynamo=True, verbose=False)
    atomic_write_bytes(path, program.model_proto.SerializeToString())
    return path


def onnx_max_difference(path: str | os.PathLike, segmenter: SegmenterBase, rgb: torch.Tensor,
                        aux: torch.Tensor | None = None, aux_missing: torch.Tensor | None = None,
                        relative: bool = False) -> float:
    """Largest ``|onnxruntime - PyTorch|`` over the logits of one input, CPU provider, eval mode
    (with ``relative``, divided by the largest absolute PyTorch logit).

    Feeds the graph the inputs it has, in the precision it takes (an fp16 graph gets the inputs
    rounded to fp16 and is compared with the segmenter as it is, fp32): ``aux_missing`` for a
    graph of ``aux_missing_input=True``, ``rgb`` alone for one of ``rgb_only=True`` (compared with
    ``segmenter(rgb)``).
    """
    require_module("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_inputs = [node.name for node in session.get_inputs()]
    if graph_inputs == ["rgb"]:
        aux = aux_missing = None
    elif MISSING_INPUT in graph_inputs and aux_missing is None:
        raise ValueError("this graph takes aux_missing: give the bool [B] flags to compare with")
    with _eval_mode(segmenter), torch.no_grad():
        expected = segmenter(rgb, aux, aux_missing=aux_missing).float().cpu()
    given = {"rgb": rgb, "aux": aux, MISSING_INPUT: aux_missing}
    half = {node.name for node in session.get_inputs() if node.type == "tensor(float16)"}
    feeds = {name: (given[name].half() if name in half else given[name]).detach().cpu().numpy() for name in graph_inputs}
    (logits,) = session.run([OUTPUT_NAME], feeds)
    if tuple(logits.shape) != tuple(expected.shape):
        raise ValueError(f"ONNX logits {tuple(logits.shape)} differ in shape from PyTorch's {tuple(expected.shape)}")
    difference = float((torch.from_numpy(logits).float() - expected).abs().max())
    return difference / max(float(expected.abs().max()), 1e-12) if relative else difference


__all__ = ["EXPORT_DTYPES", "FP16_RELATIVE_TOLERANCE", "PARITY_TOLERANCE", "check_export_dtype", "check_missing_mode",
           "example_inputs", "export_onnx", "onnx_max_difference"]
