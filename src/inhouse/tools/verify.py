"""Run an ONNX graph on sample inputs and compare it with a reference: max abs difference,
top-1 agreement and (for quantization) speed."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inhouse.errors import ConversionError


def session(onnx_bytes: bytes) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])


def run(sess: Any, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    feed = {}
    for i in sess.get_inputs():
        if i.name not in inputs:
            raise ConversionError(f"No sample data for model input '{i.name}' (have {sorted(inputs)}).")
        feed[i.name] = inputs[i.name]
    try:
        values = sess.run(None, feed)
    except Exception as err:
        raise ConversionError(f"onnxruntime failed on the sample inputs: {err}") from None
    return {o.name: np.asarray(v) for o, v in zip(sess.get_outputs(), values, strict=True)}


@dataclass
class OutputDiff:
    name: str
    max_abs_diff: float | None  # numeric outputs; None for string labels
    agreement: float | None = None  # top-1 agreement ([batch, classes] scores) or label agreement
    labels: bool = False  # a label / integer output, compared for equality


@dataclass
class Comparison:
    outputs: list[OutputDiff] = field(default_factory=list)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs if not o.labels and o.max_abs_diff is not None),
                   default=0.0)

    @property
    def min_agreement(self) -> float | None:
        values = [o.agreement for o in self.outputs if o.agreement is not None]
        return min(values) if values else None

    def lines(self) -> list[str]:
        rows = []
        for o in self.outputs:
            if o.labels:
                rows.append(f"{o.name}: labels agree on {o.agreement:.1%} of samples")
                continue
            extra = f", top-1 agreement {o.agreement:.1%}" if o.agreement is not None else ""
            rows.append(f"{o.name}: max abs diff {o.max_abs_diff:.3g}{extra}")
        return rows

    def problems(self, tolerance: float, min_agreement: float) -> list[str]:
        bad = []
        for o in self.outputs:
            if not o.labels and o.max_abs_diff is not None and not o.max_abs_diff <= tolerance:
                bad.append(f"'{o.name}' differs by up to {o.max_abs_diff:.3g} (tolerance {tolerance:g})")
            if o.agreement is not None and o.agreement < min_agreement:
                bad.append(f"'{o.name}' agrees on only {o.agreement:.1%} of samples")
        return bad


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> Comparison:
    """Compare outputs by name (or by position where names differ, e.g. a framework's own output)."""
    result = Comparison()
    ref_items = list(reference.items())
    cand_items = list(candidate.items())
    if len(ref_items) != len(cand_items):
        raise ConversionError(f"The models give {len(ref_items)} and {len(cand_items)} outputs; they must agree.")
    names_match = set(reference) == set(candidate)
    for i, (name, ref_v) in enumerate(ref_items):
        cand = np.asarray(candidate[name] if names_match else cand_items[i][1])
        ref = np.asarray(ref_v)
        if ref.size != cand.size:
            raise ConversionError(f"Output '{name}' has shape {cand.shape}, expected {ref.shape}.")
        ref, cand = ref.reshape(cand.shape), cand
        kinds = ref.dtype.kind + cand.dtype.kind
        if any(k in "OUSb" for k in kinds) or all(k in "iu" for k in kinds):
            eq = np.asarray(ref.astype(str) == cand.astype(str)) if ref.dtype.kind in "OUS" else ref == cand
            agree = float(np.mean(eq)) if eq.size else 1.0
            numeric = ref.dtype.kind in "iub" and cand.dtype.kind in "iub"
            diff = None
            if numeric and ref.size:
                diff = float(np.max(np.abs(ref.astype(np.float64) - cand.astype(np.float64))))
            result.outputs.append(OutputDiff(name, diff, agree, labels=True))
            continue
        r, c = ref.astype(np.float64), cand.astype(np.float64)
        diff = float(np.max(np.abs(r - c))) if r.size else 0.0
        top1 = None
        shape: tuple[int, ...] = tuple(r.shape)
        if len(shape) >= 2 and shape[-1] > 1:
            top1 = float(np.mean(np.argmax(r, axis=-1) == np.argmax(c, axis=-1)))
        result.outputs.append(OutputDiff(name, diff, top1))
    return result


def median_latency(sess: Any, inputs: dict[str, np.ndarray], min_time_s: float = 0.5, min_runs: int = 5,
                   max_runs: int = 200) -> float:
    """Median wall time of one ``run`` in seconds, after one warm-up call."""
    run(sess, inputs)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_runs and (len(times) < min_runs or time.perf_counter() - start < min_time_s):
        t0 = time.perf_counter()
        run(sess, inputs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)
