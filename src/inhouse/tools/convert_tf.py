"""TensorFlow SavedModels → ONNX with tf2onnx, checked against TensorFlow on sample inputs."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from inhouse.errors import ConversionError
from inhouse.tools.extras import require


def is_saved_model(src: Path) -> bool:
    return src.is_dir() and (src / "saved_model.pb").is_file()


def export(src: Path, opset: int, signature: str = "serving_default") -> bytes:
    require("tensorflow", "convert-tf")
    require("tf2onnx", "convert-tf")
    with tempfile.TemporaryDirectory(prefix="inhouse-tf-") as tmp:
        out = Path(tmp) / "model.onnx"
        proc = subprocess.run(
            [sys.executable, "-m", "tf2onnx.convert", "--saved-model", str(src), "--output", str(out),
             "--opset", str(opset), "--signature_def", signature],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0 or not out.is_file():
            tail = "\n".join(proc.stderr.strip().splitlines()[-5:])
            raise ConversionError(f"tf2onnx could not convert {src}:\n{tail}")
        return out.read_bytes()


def reference_outputs(src: Path, inputs: dict[str, np.ndarray],
                      signature: str = "serving_default") -> dict[str, np.ndarray]:
    tf = require("tensorflow", "convert-tf")
    fn = tf.saved_model.load(str(src)).signatures[signature]
    feed = {k.split(":")[0]: tf.constant(v) for k, v in inputs.items()}
    return {k: v.numpy() for k, v in fn(**feed).items()}
