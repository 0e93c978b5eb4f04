"""``inhouse quantize``: dynamic INT8 (onnxruntime.quantization) or FP16 (onnxconverter-common)
versions of a served ONNX model, written as a new version, with an optional accuracy and
speed check against the source version on this machine. INT8 quantizes what has constant
weights (MatMul, Gemm, Conv, Gather, …); a graph with none of these (e.g. a scikit-learn linear
model, one ``ai.onnx.ml`` operator) gets a note and no new version."""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import onnx

from inhouse.errors import ConversionError, ModelFormatError
from inhouse.tools.extras import require
from inhouse.tools.onnx_info import graph_io, merge_opset_imports, read_spec_doc, versions_in, write_version
from inhouse.tools.samples import load_npz
from inhouse.tools.verify import Comparison, compare, median_latency, run, session

Mode = Literal["int8", "fp16"]


@dataclass
class QuantizeResult:
    model_dir: Path
    source_version: int
    version: int
    artefact: Path
    mode: Mode
    size_before: int
    size_after: int
    comparison: Comparison | None = None
    latency_before_s: float | None = None
    latency_after_s: float | None = None
    note: str | None = None  # set when nothing was written, saying why

    @property
    def speedup(self) -> float | None:
        if self.latency_before_s and self.latency_after_s:
            return self.latency_before_s / self.latency_after_s
        return None


def source_artefact(model_dir: Path, version: int | None) -> tuple[int, Path]:
    if not model_dir.is_dir():
        raise ConversionError(f"{model_dir} is not a model folder.")
    versions = versions_in(model_dir)
    if not versions:
        raise ConversionError(f"{model_dir} has no version folders (1/, 2/, …) to quantize.")
    if version is None:
        version = versions[-1]
    elif version not in versions:
        raise ConversionError(f"{model_dir} has no version {version} (versions: {versions}).")
    doc = read_spec_doc(model_dir)
    backend = doc.get("backend", "onnxruntime")
    if backend != "onnxruntime":
        raise ModelFormatError(f"{model_dir} uses backend '{backend}'; inhouse quantize works on ONNX models.")
    filename = (doc.get("onnxruntime") or {}).get("file", "model.onnx")
    path = model_dir / str(version) / filename
    if not path.is_file():
        raise ConversionError(f"{path} does not exist.")
    return version, path


def _keep_output_types(original: onnx.ModelProto, converted: onnx.ModelProto) -> onnx.ModelProto:
    """Cast outputs back to their original type where the converter left them in FP16 (it does
    for some ai.onnx.ml operators), so clients and model.yaml see the same tensors as before."""
    want = {o.name: o.type.tensor_type.elem_type for o in original.graph.output}
    for out in converted.graph.output:
        elem = want.get(out.name)
        if elem is None or out.type.tensor_type.elem_type == elem:
            continue
        inner = f"{out.name}__fp16"
        for node in converted.graph.node:
            for i, name in enumerate(node.output):
                if name == out.name:
                    node.output[i] = inner
            for i, name in enumerate(node.input):
                if name == out.name:
                    node.input[i] = inner
        converted.graph.node.append(onnx.helper.make_node("Cast", [inner], [out.name], to=elem))
        out.type.tensor_type.elem_type = elem
    return converted


def quantize_bytes(src: Path, mode: Mode, per_channel: bool = False) -> bytes:
    try:
        model = onnx.load(str(src))
    except Exception as err:
        raise ModelFormatError(f"{src} is not a readable ONNX model: {err}") from None
    if mode == "fp16":
        float16 = require("onnxconverter_common.float16", "quantize")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # per-constant range notices
                converted = float16.convert_float_to_float16(model, keep_io_types=True)
        except Exception as err:
            raise ConversionError(f"FP16 conversion failed: {err}") from None
        return bytes(_keep_output_types(model, converted).SerializeToString())
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="inhouse-quant-") as tmp:
        pre = Path(tmp) / "in.onnx"
        out = Path(tmp) / "out.onnx"
        # Exporters record intermediate shapes (value_info) that the quantizer's own shape
        # inference may contradict (the torch.export exporter does): let it infer them afresh.
        del model.graph.value_info[:]
        onnx.save(merge_opset_imports(model), str(pre))
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # onnxruntime.quantization logs advice on the root logger
        try:
            quantize_dynamic(str(pre), str(out), weight_type=QuantType.QInt8, per_channel=per_channel)
        except Exception as err:
            raise ConversionError(f"INT8 quantization failed: {err}") from None
        finally:
            root.setLevel(level)
        return out.read_bytes()


def _eight_bit_weights(model: onnx.ModelProto) -> int:
    return sum(t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8) for t in model.graph.initializer)


def quantize(model_dir: Path, mode: Mode, *, version: int | None = None, check: Path | None = None,
             per_channel: bool = False, tolerance: float | None = None,
             step: Callable[[str], None] = lambda _: None) -> QuantizeResult:
    src_version, src = source_artefact(model_dir, version)
    step(f"{'quantizing' if mode == 'int8' else 'converting'} version {src_version} to {mode.upper()}")
    data = quantize_bytes(src, mode, per_channel)
    result = QuantizeResult(model_dir, src_version, 0, src, mode, src.stat().st_size, len(data))
    if mode == "int8":
        original = onnx.load(str(src))
        if _eight_bit_weights(onnx.load_from_string(data)) <= _eight_bit_weights(original):
            ops = sorted({f"{n.op_type} ({n.domain})" if n.domain else n.op_type for n in original.graph.node})
            result.version, result.size_after = src_version, result.size_before
            result.note = (f"nothing to quantize: dynamic INT8 quantizes the constant weights of MatMul, Gemm, "
                           f"Conv, Gather and similar operators, and version {src_version} has none "
                           f"(its operators: {', '.join(ops)}). No version was written; serve version "
                           f"{src_version} as it is.")
            return result
    if check is not None:
        inputs_spec, _ = graph_io(onnx.load(str(src)))
        samples = load_npz(check, [i["name"] for i in inputs_spec])
        before, after = session(src.read_bytes()), session(data)
        step("comparing outputs on the samples")
        result.comparison = compare(run(before, samples), run(after, samples))
        step("timing both versions on this machine")
        result.latency_before_s = median_latency(before, samples)
        result.latency_after_s = median_latency(after, samples)
        if tolerance is not None:
            bad = result.comparison.problems(tolerance, 0.0)
            if bad:
                raise ConversionError("The quantized model is outside the tolerance: " + "; ".join(bad)
                                      + ". Nothing was written.")
    step("writing the new version")
    result.version, result.artefact = write_version(model_dir, data, {}, filename=src.name)
    return result
