"""Optional dependencies: import them on demand, or say which extra installs them."""

from __future__ import annotations

import importlib
from types import ModuleType

from inhouse.errors import MissingExtraError

# extra name -> what it is for (shown in messages)
EXTRAS = {
    "convert-torch": "PyTorch models (torch.onnx.export)",
    "convert-sklearn": "scikit-learn, XGBoost and LightGBM models (skl2onnx, onnxmltools)",
    "convert-hf": "Hugging Face model folders (transformers, exported with torch.onnx)",
    "convert-tf": "TensorFlow SavedModels (tf2onnx)",
    "quantize": "FP16 conversion (onnxconverter-common)",
}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` or fail with the pip command that installs the extra providing it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingExtraError(
            f"Converting {EXTRAS.get(extra, extra)} needs the Python package '{module.split('.')[0]}', "
            f"which is not installed ({err}). Install it with: pip install 'inhouse[{extra}]'"
        ) from None
