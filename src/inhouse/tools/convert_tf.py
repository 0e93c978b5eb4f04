"""TensorFlow SavedModels → ONNX with tf2onnx, checked against TensorFlow on sample inputs.

tf2onnx runs in a child process (``python -m tf2onnx.convert``): it is TensorFlow's own graph
rewriting, and a crash or a leak there must not take this process with it."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from inhouse.errors import ConversionError
from inhouse.tools.extras import require


def is_saved_model(src: Path) -> bool:
    return src.is_dir() and (src / "saved_model.pb").is_file()


def _quiet_env() -> dict[str, str]:
    return {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_ENABLE_ONEDNN_OPTS": "0"}


def _signature(src: Path, name: str) -> Any:
    """The loaded signature function, or a ConversionError naming the signatures there are."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    tf = require("tensorflow", "convert-tf")
    try:
        loaded = tf.saved_model.load(str(src))
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"TensorFlow cannot load the SavedModel {src}: {first}") from None
    sigs = dict(loaded.signatures)
    if name not in sigs:
        have = ", ".join(sorted(sigs)) or "none"
        raise ConversionError(f"The SavedModel {src} has no signature '{name}' (it has: {have}); choose one with "
                              "--signature.")
    return sigs[name]


def export(src: Path, opset: int, signature: str = "serving_default") -> bytes:
    require("tf2onnx", "convert-tf")
    _signature(src, signature)
    with tempfile.TemporaryDirectory(prefix="inhouse-tf-") as tmp:
        out = Path(tmp) / "model.onnx"
        proc = subprocess.run(
            [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(src), "--output", str(out),
             "--opset", str(opset), "--signature_def", signature],
            capture_output=True, text=True, check=False, env=_quiet_env(),
        )
        if proc.returncode != 0 or not out.is_file():
            lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
            errors = [ln for ln in lines if "Error" in ln or "error" in ln] or lines
            raise ConversionError(f"tf2onnx could not convert {src}: " + " / ".join(errors[-3:]))
        return out.read_bytes()


def reference_outputs(src: Path, inputs: dict[str, np.ndarray],
                      signature: str = "serving_default") -> dict[str, np.ndarray]:
    """The signature's outputs on ``inputs`` (keyed by ONNX input name, which is the signature's
    input name, possibly with a ':0' suffix), named as tf2onnx names them."""
    tf = require("tensorflow", "convert-tf")
    fn = _signature(src, signature)
    feed = {k.split(":")[0]: tf.constant(v) for k, v in inputs.items()}
    try:
        result = fn(**feed)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConversionError(f"TensorFlow fails on the sample inputs: {first}") from None
    return {k: v.numpy() for k, v in result.items()}
