"""scikit-learn, XGBoost and LightGBM → ONNX (skl2onnx, onnxmltools). Classifiers get a
``label`` and a ``probabilities`` output, regressors a ``variable`` output."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np

from inhouse.errors import ConversionError
from inhouse.tools.extras import require
from inhouse.tools.onnx_info import merge_opset_imports

ML_OPSET = 3


def load_estimator(src: Path) -> Any:
    # Pickles run code while loading: the file must come from the user's own training.
    try:
        try:
            import joblib

            return joblib.load(src)
        except ImportError:  # pragma: no cover - scikit-learn brings joblib
            with src.open("rb") as f:
                return pickle.load(f)  # noqa: S301
    except ModuleNotFoundError as err:
        pkg = (err.name or "").split(".")[0]
        extra = "convert-sklearn"
        raise ConversionError(f"{src} was saved with the package '{pkg}', which is not installed; install it "
                              f"(pip install 'inhouse[{extra}]' brings xgboost and lightgbm).") from None
    except Exception as err:
        raise ConversionError(f"{src} cannot be read as a pickled / joblib model: {err}") from None


def family(model: Any) -> str:
    mod = type(model).__module__.split(".")[0]
    if mod in ("xgboost", "lightgbm"):
        return mod
    if mod == "sklearn" or hasattr(model, "predict"):
        return "sklearn"
    raise ConversionError(f"A {type(model).__name__} is not a scikit-learn, XGBoost or LightGBM model.")


def n_features(model: Any, given: int | None) -> int:
    known = getattr(model, "n_features_in_", None)
    if given is not None:
        if known is not None and int(known) != given:
            raise ConversionError(f"--features {given} disagrees with the model, which was trained on {known}.")
        return given
    if known is None:
        raise ConversionError("The model does not record how many features it takes; pass --features N.")
    return int(known)


def is_classifier(model: Any) -> bool:
    return hasattr(model, "predict_proba") and hasattr(model, "classes_")


def export(model: Any, features: int, opset: int) -> bytes:
    kind = family(model)
    require("skl2onnx", "convert-sklearn")
    try:
        if kind == "sklearn":
            import skl2onnx
            from skl2onnx.common.data_types import FloatTensorType

            types = [("features", FloatTensorType([None, features]))]
            opset = min(opset, skl2onnx.get_latest_tested_opset_version())
            options = {id(model): {"zipmap": False}} if is_classifier(model) else None
            onx = skl2onnx.to_onnx(model, initial_types=types, options=options,
                                   target_opset={"": opset, "ai.onnx.ml": ML_OPSET})
        else:
            onnxmltools = require("onnxmltools", "convert-sklearn")
            from onnxmltools.convert.common.data_types import FloatTensorType as MLFloatTensorType
            from onnxmltools.convert.common.onnx_ex import get_maximum_opset_supported

            types = [("features", MLFloatTensorType([None, features]))]
            opset = min(opset, get_maximum_opset_supported())
            if kind == "lightgbm":
                onx = onnxmltools.convert_lightgbm(model, initial_types=types, target_opset=opset, zipmap=False)
            else:
                onx = onnxmltools.convert_xgboost(model, initial_types=types, target_opset=opset)
    except ConversionError:
        raise
    except Exception as err:
        raise ConversionError(f"Converting the {type(model).__name__} failed: {err}") from None
    return bytes(merge_opset_imports(_rename_outputs(onx, is_classifier(model))).SerializeToString())


def _rename_outputs(onx: Any, classifier: bool) -> Any:
    """Give every converter's outputs the same names: label/probabilities or variable."""
    wanted = ["label", "probabilities"] if classifier else ["variable"]
    outs = list(onx.graph.output)
    for out in outs:  # some converters declare a fixed batch of 1
        dims = out.type.tensor_type.shape.dim
        if len(dims):
            dims[0].Clear()
            dims[0].dim_param = "batch"
    if len(outs) != len(wanted):
        return onx
    for out, new in zip(outs, wanted, strict=True):
        old = out.name
        if old == new:
            continue
        for node in onx.graph.node:
            for i, name in enumerate(node.output):
                if name == old:
                    node.output[i] = new
            for i, name in enumerate(node.input):
                if name == old:
                    node.input[i] = new
        out.name = new
    return onx


def reference_outputs(model: Any, x: np.ndarray) -> dict[str, np.ndarray]:
    if is_classifier(model):
        return {"label": np.asarray(model.predict(x)), "probabilities": np.asarray(model.predict_proba(x))}
    return {"variable": np.asarray(model.predict(x), dtype=np.float64).reshape(len(x), -1)}
