"""gopt-adapter: GoPT grouping prompters for frozen timm Vision Transformers.

Two lines from a pretrained timm ViT to an RGB-X segmenter::

    model = timm.create_model("vit_base_patch16_224", pretrained=True, dynamic_img_size=True)
    segmenter = apply_gopt(model, aux_channels=1, num_classes=40)
"""

from .adapter import GoptAdapter
from .errors import AdapterError
from .adapter_file import read_adapter_file
from .backbone import BackboneSpec
from .calibration import CalibrationReport, calibrate_missing_mode
from .config import GoptConfig
from .contract import SegmentationAdapter
from .export import export_onnx
from .gopt_segmenter import GoptSegmenter, apply_gopt, load_adapter, remove_gopt, save_adapter
from .parameters import ParameterCount, count_parameters
from .preprocessing import Preprocessing
from .gopt_segmenter import restore_segmenter
from .segmenter import PromptedSegmenter, SegmenterBase
from .version import __version__

__all__ = [
    "AdapterError",
    "BackboneSpec",
    "CalibrationReport",
    "GoptAdapter",
    "GoptConfig",
    "GoptSegmenter",
    "ParameterCount",
    "Preprocessing",
    "PromptedSegmenter",
    "SegmentationAdapter",
    "SegmenterBase",
    "apply_gopt",
    "calibrate_missing_mode",
    "count_parameters",
    "export_onnx",
    "load_adapter",
    "read_adapter_file",
    "remove_gopt",
    "restore_segmenter",
    "save_adapter",
    "__version__",
]
