"""ONNX export of a segmenter with its active adapter, and the parity check against PyTorch.

GoPT's prompts depend on the input, so unlike LoRA they cannot be merged into the backbone:
the whole segmenter (frozen blocks, prompters, head, upsampling) goes into one graph, with
inputs ``rgb [B, 3, H, W]`` and ``aux [B, C_aux, H, W]`` and output ``logits [B, K, H, W]``.
The batch axis is always dynamic; ``H`` and ``W`` are dynamic with ``dynamic_size=True``.
Needs the ``export`` extra (``pip install gopt-adapter[export]``: onnx, onnxscript,
onnxruntime for the check).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .atomic_files import atomic_write_bytes
from .segmenter import SegmenterBase

INPUT_NAMES = ("rgb", "aux")
OUTPUT_NAME = "logits"
#: Largest ``|onnxruntime - PyTorch|`` over fp32 logits that counts as parity.
PARITY_TOLERANCE = 1e-4
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


def export_onnx(segmenter: SegmenterBase, path: str | os.PathLike, image_size: tuple[int, int],
                dynamic_size: bool = False, opset: int | None = None) -> Path:
    """Writes the active adapter's segmenter, in eval mode, as an ONNX model at ``path``.

    ``image_size`` ``(H, W)`` is the traced size (and the only one the graph takes unless
    ``dynamic_size``); with ``dynamic_size=True`` (backbones created with
    ``dynamic_img_size=True`` only) ``H`` and ``W`` become dynamic axes. ``opset``: the ONNX
    opset (default: the exporter's). The file is written atomically; the segmenter's mode is
    restored afterwards. Check the result with :func:`onnx_max_difference`.
    """
    if not isinstance(segmenter, SegmenterBase):
        raise TypeError(f"export_onnx needs a segmenter (apply_gopt or a baseline), got {type(segmenter).__name__}")
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

    rgb, aux = example_inputs(segmenter, size)
    axes: dict[int, object] = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        axes.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    with _eval_mode(segmenter), torch.no_grad():
        program = torch.onnx.export(segmenter, (rgb, aux), input_names=list(INPUT_NAMES), output_names=[OUTPUT_NAME],
                                    dynamic_shapes=(axes, axes), opset_version=opset, dynamo=True, verbose=False)
    atomic_write_bytes(path, program.model_proto.SerializeToString())
    return path


def onnx_max_difference(path: str | os.PathLike, segmenter: SegmenterBase, rgb: torch.Tensor,
                        aux: torch.Tensor) -> float:
    """Largest ``|onnxruntime - PyTorch|`` over the logits of one input, CPU provider, eval mode."""
    require_module("onnxruntime")
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    with _eval_mode(segmenter), torch.no_grad():
        expected = segmenter(rgb, aux).float().cpu()
    feeds = {"rgb": rgb.detach().cpu().numpy(), "aux": aux.detach().cpu().numpy()}
    (logits,) = session.run([OUTPUT_NAME], feeds)
    if tuple(logits.shape) != tuple(expected.shape):
        raise ValueError(f"ONNX logits {tuple(logits.shape)} differ in shape from PyTorch's {tuple(expected.shape)}")
    return float((torch.from_numpy(logits).float() - expected).abs().max())


__all__ = ["PARITY_TOLERANCE", "export_onnx", "onnx_max_difference", "example_inputs"]
