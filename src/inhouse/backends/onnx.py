"""ONNX Runtime backend: any ONNX model, on any execution provider onnxruntime offers."""

from __future__ import annotations

import gc
import logging
import re
from typing import Any

import numpy as np
import onnxruntime as ort

from inhouse.backends import LoadContext, onnx_external
from inhouse.core.datatypes import ONNX_TO_V2
from inhouse.core.memory import release_freed_memory
from inhouse.core.spec import ModelSpec, ProviderSpec, TensorSpec
from inhouse.errors import (
    DatatypeError,
    InferenceError,
    InhouseError,
    InputNameError,
    ModelFormatError,
    ModelLoadError,
    ModelSpecError,
    OutOfMemoryError,
    ShapeError,
)
from inhouse.settings import usable_cores

log = logging.getLogger(__name__)

PROVIDER_ALIASES: dict[str, str] = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "trt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "cann": "CANNExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "dml": "DmlExecutionProvider",
    "directml": "DmlExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
}

_OPT_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

_OOM = re.compile(r"(Failed to allocate memory|bad_alloc|out of memory|CUDA_ERROR_OUT_OF_MEMORY|"
                  r"cudaErrorMemoryAllocation)", re.I)
_OPSET = re.compile(r"(opset|Opset|domain_version|is not a registered function/op|"
                    r"Could not find an implementation|not supported|IR version)", re.I)


def resolve_providers(spec: ModelSpec) -> list[tuple[str, dict[str, Any]]]:
    """The execution providers to ask for, in priority order, with their options.
    An unavailable provider is an error that lists the available ones."""
    wanted: list[ProviderSpec] = spec.onnxruntime.provider_list()
    available = ort.get_available_providers()
    if not wanted:
        device = spec.instances.device
        has_cuda = "CUDAExecutionProvider" in available
        if device == "auto":
            device = "cuda" if has_cuda else "cpu"
        if device.startswith(("cuda", "gpu")):
            if not has_cuda and spec.resources.gpu > 0:
                raise ModelSpecError(
                    f"Model '{spec.name}' asks for resources.gpu: {spec.resources.gpu}, but this onnxruntime "
                    f"build sees no CUDA GPU (available: {', '.join(available)}). Install onnxruntime-gpu on a "
                    "machine with a GPU, set resources.allow_cpu_fallback: true to run on the CPU, or remove "
                    "resources.gpu."
                )
            idx = device.partition(":")[2] or "0"
            wanted = [ProviderSpec(name="cuda", options={"device_id": int(idx)})]
        else:
            wanted = [ProviderSpec(name="cpu")]
    out: list[tuple[str, dict[str, Any]]] = []
    for p in wanted:
        full = PROVIDER_ALIASES.get(p.name.lower(), p.name)
        if full not in available:
            raise ModelFormatError(
                f"Model '{spec.name}' asks for execution provider '{p.name}' ({full}), which this "
                f"onnxruntime build does not offer. Available: {', '.join(available)}. Install the "
                "matching onnxruntime package (e.g. onnxruntime-gpu) or change onnxruntime.providers."
            )
        out.append((full, {k: str(v) if isinstance(v, bool) else v for k, v in p.options.items()}))
    if all(name != "CPUExecutionProvider" for name, _ in out):
        out.append(("CPUExecutionProvider", {}))  # fallback for ops the accelerator lacks
    return out


_ORT_PREFIX = re.compile(r"^\[ONNXRuntimeError\] : \d+ : [A-Z_]+ : ")
# "/onnxruntime_src/…/file.h:46 void ns::Func(args…) " — where in onnxruntime, not what went wrong
_ORT_SOURCE = re.compile(r"\S+\.(?:h|cc|cpp):\d+ .*?\)\s+(?=[A-Z])")
_CORRUPT = re.compile(r"(INVALID_PROTOBUF|protobuf parsing failed|No graph was found)", re.I)


def _short_ort_message(text: str) -> str:
    """The part of an onnxruntime message a user can act on: no status prefix, no C++ location."""
    msg = text.strip().splitlines()[0] if text.strip() else ""
    msg = _ORT_SOURCE.sub("", _ORT_PREFIX.sub("", msg)).strip()
    return msg[:400].rstrip(". ")


def map_ort_error(err: Exception, what: str) -> InhouseError:
    """Turn an onnxruntime exception into the most specific inhouse error we can find."""
    text = str(err)
    short = _short_ort_message(text) or type(err).__name__
    if _OOM.search(text):
        return OutOfMemoryError(f"Out of memory while {what}: {short}. Free memory, lower "
                                "max_batch_size or instances.count, or use a smaller model.")
    name = type(err).__name__
    if name == "InvalidProtobuf" or _CORRUPT.search(_ORT_SOURCE.sub("", _ORT_PREFIX.sub("", text))):
        return ModelFormatError(
            f"While {what}: the file is not a readable ONNX model ({short}); it is truncated, corrupted "
            "or not ONNX at all. Copy the complete .onnx file again or re-export it."
        )
    if name in ("InvalidGraph", "NotImplemented") or (name == "Fail" and _OPSET.search(text)):
        return ModelFormatError(
            f"onnxruntime {ort.__version__} cannot run this model while {what}: {short}. "
            "Re-export it with an opset and IR version this runtime supports, or upgrade onnxruntime."
        )
    if name == "InvalidArgument":
        low = text.lower()
        if "type" in low and ("expected" in low or "unexpected" in low):
            return DatatypeError(f"onnxruntime rejected an input while {what}: {short}")
        if "invalid input name" in low or "invalid output name" in low:
            return InputNameError(f"onnxruntime rejected a name while {what}: {short}")
        return ShapeError(f"onnxruntime rejected an input while {what}: {short}")
    if name in ("Fail", "RuntimeException", "EPFail", "EngineError"):
        return InferenceError(f"onnxruntime failed while {what}: {short}")
    return ModelLoadError(f"onnxruntime failed while {what}: {short}")


def _as_onnx_strings(name: str, arr: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors hold Python ``str``; v2 BYTES arrive as ``bytes``."""
    out = np.empty(arr.shape, dtype=object)
    flat_in, flat_out = arr.ravel(), out.ravel()
    try:
        for i, item in enumerate(flat_in):
            flat_out[i] = item.decode("utf-8") if isinstance(item, bytes) else item
    except UnicodeDecodeError:
        raise DatatypeError(f"Input '{name}' holds bytes that are not UTF-8 text, which ONNX "
                            "string tensors require.") from None
    return out


def _dims(shape: Any) -> list[int]:
    return [d if isinstance(d, int) and d > 0 else -1 for d in (shape or [])]


# providers that compute on the calling machine's CPU; any other (CUDA, TensorRT, …) waits on a device
_CPU_PROVIDERS = frozenset({"CPUExecutionProvider", "DnnlExecutionProvider", "XnnpackExecutionProvider"})


class OnnxModel:
    platform = "onnxruntime_onnx"

    def __init__(self, session: ort.InferenceSession, inputs: list[TensorSpec],
                 outputs: list[TensorSpec]) -> None:
        # run() releases the GIL and never blocks on Python code: on the CPU a call the scheduler
        # measured as cheap may run on the event loop itself; a call waiting on a device never does
        self.inline_safe = all(p in _CPU_PROVIDERS for p in session.get_providers())
        self._session: ort.InferenceSession | None = session
        self.inputs = inputs
        self.outputs = outputs
        self._all_outputs = [o.name for o in outputs]
        self._run_options = ort.RunOptions()

    @property
    def session(self) -> ort.InferenceSession:
        if self._session is None:
            raise InferenceError("This model version has been unloaded.")
        return self._session

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        names = outputs or self._all_outputs
        feed = {k: _as_onnx_strings(k, v) if v.dtype == object else v for k, v in inputs.items()}
        try:
            results = self.session.run(names, feed, self._run_options)
        except Exception as err:  # onnxruntime raises its own pybind11 exception types
            raise map_ort_error(err, "running the model") from None
        return dict(zip(names, results, strict=True))

    def close(self) -> None:
        self._session = None
        gc.collect()
        release_freed_memory()


class OnnxBackend:
    name = "onnxruntime"

    def load(self, ctx: LoadContext) -> OnnxModel:
        spec = ctx.spec
        cfg = spec.onnxruntime
        data = ctx.read_artefact(cfg.file)
        so = ort.SessionOptions()
        so.graph_optimization_level = _OPT_LEVELS[cfg.graph_optimization_level]
        so.execution_mode = (ort.ExecutionMode.ORT_PARALLEL if cfg.execution_mode == "parallel"
                             else ort.ExecutionMode.ORT_SEQUENTIAL)
        copies = int(ctx.options.get("copies", 1))
        if cfg.intra_op_threads:
            so.intra_op_num_threads = cfg.intra_op_threads
        elif copies > 1:
            # every worker loads its own copy: onnxruntime's default (a thread per core) in each
            # would put N threads on every core, and a compute-bound model loses ~16 % to the switching
            so.intra_op_num_threads = max(1, usable_cores() // copies)
        if cfg.inter_op_threads:
            so.inter_op_num_threads = cfg.inter_op_threads
        spinning = cfg.spinning
        if spinning is None:
            spinning = bool(ctx.options.get("onnx_spinning", False))
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        so.add_session_config_entry("session.inter_op.allow_spinning", "1" if spinning else "0")
        so.log_severity_level = 3
        providers = resolve_providers(spec)
        external = onnx_external.prepare(ctx, cfg.file, data)  # weights kept beside the graph (> 2 GB models)
        external.apply(so)
        try:
            session = ort.InferenceSession(
                data, sess_options=so,
                providers=[p for p, _ in providers], provider_options=[o for _, o in providers],
            )
        except Exception as err:
            raise map_ort_error(err, f"loading model '{spec.name}' version {ctx.version_dir.name}") from None
        finally:
            del data
            external.release()
        graph_in = [TensorSpec(name=i.name, dtype=self._v2(i.type, spec.name, i.name), shape=_dims(i.shape))
                    for i in session.get_inputs()]
        graph_out = [TensorSpec(name=o.name, dtype=self._v2(o.type, spec.name, o.name), shape=_dims(o.shape))
                     for o in session.get_outputs()]
        inputs = reconcile(spec.name, "input", spec.inputs, graph_in)
        outputs = reconcile(spec.name, "output", spec.outputs, graph_out)
        return OnnxModel(session, inputs, outputs)

    @staticmethod
    def _v2(onnx_type: str, model: str, tensor: str) -> str:
        dt = ONNX_TO_V2.get(onnx_type)
        if dt is None:
            raise ModelFormatError(
                f"Model '{model}' tensor '{tensor}' has type {onnx_type}, which inhouse cannot "
                "exchange over KServe v2; export it with a plain tensor type."
            )
        return dt


def reconcile(model: str, kind: str, declared: list[TensorSpec] | None,
              graph: list[TensorSpec]) -> list[TensorSpec]:
    """Check the spec's tensors against the graph's; fill whatever the spec leaves out."""
    if declared is None:
        return graph
    by_name = {t.name: t for t in graph}
    unknown = [t.name for t in declared if t.name not in by_name]
    if unknown:
        raise ModelFormatError(
            f"Model '{model}': model.yaml names {kind}(s) {unknown} that the ONNX graph does not "
            f"have; the graph's {kind}s are {list(by_name)}. Fix the names or omit '{kind}s' "
            "to take them from the graph."
        )
    if kind == "input":
        missing = [n for n in by_name if n not in {t.name for t in declared}]
        if missing:
            raise ModelFormatError(
                f"Model '{model}': the ONNX graph needs input(s) {missing} that model.yaml does not "
                "list; add them or omit 'inputs'."
            )
    out: list[TensorSpec] = []
    for t in declared:
        g = by_name[t.name]
        if t.dtype != g.dtype:
            raise DatatypeError(
                f"Model '{model}': model.yaml declares {kind} '{t.name}' as {t.dtype} but the graph "
                f"has {g.dtype}; write dtype: {g.dtype}."
            )
        if g.shape and len(t.shape) != len(g.shape):
            raise ShapeError(
                f"Model '{model}': model.yaml declares {kind} '{t.name}' with rank {len(t.shape)} "
                f"({t.shape}) but the graph has rank {len(g.shape)} ({g.shape})."
            )
        for i, (a, b) in enumerate(zip(t.shape, g.shape, strict=False)):
            if a != -1 and b != -1 and a != b:
                raise ShapeError(
                    f"Model '{model}': {kind} '{t.name}' dimension {i} is {a} in model.yaml but "
                    f"{b} in the graph; write {b} or -1."
                )
        out.append(t)
    return out
