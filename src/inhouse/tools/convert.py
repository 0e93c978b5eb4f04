"""``inhouse convert``: turn a trained model into a served one — an ONNX file in a new
version folder, a model.yaml with inputs and outputs filled in — and check the ONNX model
against the original framework on sample inputs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from inhouse.errors import ConversionError, ModelFormatError
from inhouse.tools import convert_hf, convert_tabular, convert_tf, convert_torch
from inhouse.tools.onnx_info import check_runtime_loads, choose_opset, graph_io, write_version
from inhouse.tools.samples import ExampleInput, inputs_for_spec, load_npz, parse_example_input, random_array
from inhouse.tools.verify import Comparison, compare, run, session

TORCH_SUFFIXES = {".pt", ".pth", ".pt2", ".ts", ".torchscript", ".jit"}
TABULAR_SUFFIXES = {".pkl", ".pickle", ".joblib", ".sav"}


@dataclass
class ConvertOptions:
    out: Path
    example_inputs: list[str] = field(default_factory=list)
    features: int | None = None
    opset: int | None = None
    exporter: str = "auto"  # torch: auto | dynamo | legacy
    output_names: list[str] | None = None
    samples: Path | None = None
    sequence_axis: bool = True
    int_high: int = 10  # integer sample inputs are drawn from [0, int_high)
    tolerance: float = 1e-3
    min_agreement: float = 0.99
    verify: bool = True
    task: str = "auto"  # Hugging Face task
    signature: str = "serving_default"  # TensorFlow SavedModel signature


@dataclass
class ConvertResult:
    framework: str
    model_dir: Path
    version: int
    artefact: Path
    opset: int
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    comparison: Comparison | None
    notes: list[str] = field(default_factory=list)


Step = Callable[[str], None]


def detect_framework(src: Path) -> str:
    if not src.exists():
        raise ConversionError(f"{src} does not exist.")
    if src.is_dir():
        if convert_hf.is_hf_folder(src):
            return "huggingface"
        if convert_tf.is_saved_model(src):
            return "tensorflow"
        raise ModelFormatError(f"{src} is a folder but neither a Hugging Face model (config.json) nor a "
                               "TensorFlow SavedModel (saved_model.pb).")
    suffix = src.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        return "pytorch"
    if suffix in TABULAR_SUFFIXES:
        return "tabular"
    if suffix == ".onnx":
        return "onnx"
    if suffix in (".h5", ".keras"):
        raise ModelFormatError(f"{src}: export Keras models as a SavedModel first (model.export('dir')), "
                               "then convert that folder.")
    raise ModelFormatError(
        f"{src}: cannot tell the framework from the suffix '{suffix}'. Supported: PyTorch "
        f"({', '.join(sorted(TORCH_SUFFIXES))}), scikit-learn / XGBoost / LightGBM "
        f"({', '.join(sorted(TABULAR_SUFFIXES))}), .onnx, Hugging Face and SavedModel folders."
    )


def convert(src: Path, opts: ConvertOptions, step: Step = lambda _: None) -> ConvertResult:
    framework = detect_framework(src)
    if opts.out.exists() and not opts.out.is_dir():
        raise ConversionError(f"--out {opts.out} is a file; give the model folder to write (REPO/NAME).")
    opset = choose_opset(opts.opset)
    step(f"converting a {framework} model (ONNX opset ≤ {opset})")
    notes: list[str] = []
    side_files: list[Path] = []
    comparison: Comparison | None = None
    spec_extra: dict[str, Any] = {}
    pad_values: dict[str, int] = {}
    if framework == "pytorch":
        onnx_bytes, comparison = _torch(src, opts, opset, step)
    elif framework == "tabular":
        onnx_bytes, comparison, spec_extra = _tabular(src, opts, opset, step)
        framework = spec_extra.pop("_family")
    elif framework == "huggingface":
        onnx_bytes, comparison, side_files, pad_values = _huggingface(src, opts, opset, step, notes)
    elif framework == "tensorflow":
        step(f"exporting signature '{opts.signature}' with tf2onnx (opset {opset})")
        onnx_bytes = convert_tf.export(src, opset, opts.signature)
        if opts.verify:
            step("checking the ONNX model against TensorFlow")
            samples = _samples_for(onnx_bytes, opts)
            comparison = compare(convert_tf.reference_outputs(src, samples, opts.signature),
                                 run(session(onnx_bytes), samples))
    else:
        onnx_bytes = src.read_bytes()
    step("checking that onnxruntime loads the model")
    check_runtime_loads(onnx_bytes)
    if comparison is not None:
        bad = comparison.problems(opts.tolerance, opts.min_agreement)
        if bad:
            raise ConversionError(
                "The ONNX model does not match the original on the sample inputs: " + "; ".join(bad) + ". "
                "Nothing was written. Check the example inputs, or loosen --tolerance if the difference is expected."
            )
    model = onnx.load_from_string(onnx_bytes)
    inputs, outputs = graph_io(model)
    for t in inputs:
        if t["name"] in pad_values:
            t["pad_value"] = pad_values[t["name"]]
    step(f"writing {opts.out}")
    spec = {"inputs": inputs, "outputs": outputs, **spec_extra}
    try:
        version, artefact = write_version(opts.out, onnx_bytes, spec)
        for f in side_files:
            shutil.copy2(f, artefact.parent / f.name)
    except OSError as err:
        raise ConversionError(f"Cannot write the model to {opts.out}: {err.strerror or err}. --out must be a "
                              "folder you can write to (REPO/NAME).") from None
    used_opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=opset)
    return ConvertResult(framework, opts.out, version, artefact, used_opset, inputs, outputs, comparison, notes)


def _examples(opts: ConvertOptions) -> list[ExampleInput]:
    if not opts.example_inputs:
        raise ConversionError("PyTorch models need example inputs to trace: pass --example-input, e.g. "
                              "--example-input shape=1x128:int64 (repeat it for each input).")
    return [parse_example_input(t) for t in opts.example_inputs]


def _torch(src: Path, opts: ConvertOptions, opset: int, step: Step) -> tuple[bytes, Comparison | None]:
    step(f"loading {src.name} with PyTorch")
    model, kind = convert_torch.load_module(src)
    examples = _examples(opts)
    if opts.exporter != "legacy" and kind != "script" and opts.opset is None:
        opset = max(opset, min(convert_torch.DYNAMO_OPSET, choose_opset(None)))
    step(f"exporting with torch.onnx (opset {opset})")
    onnx_bytes, in_names, _, axes = convert_torch.export(
        model, kind, examples, opset, exporter=opts.exporter, output_names=opts.output_names,
        sequence_axis=opts.sequence_axis)
    if not opts.verify:
        return onnx_bytes, None
    step("checking the ONNX model against PyTorch")
    sess = session(onnx_bytes)
    if opts.samples is not None:
        sample_sets = [load_npz(opts.samples, in_names)]
    else:
        # two shapes that differ from the traced one, so the dynamic axes are exercised too
        rng = np.random.default_rng(1)
        sample_sets = []
        for batch, seq_scale in ((3, 1.0), (1, 0.5)):
            sample = {}
            for name, e in zip(in_names, examples, strict=True):
                shape = list(e.shape)
                if shape:
                    shape[0] = batch
                if 1 in axes.get(name, {}) and len(shape) > 1:
                    shape[1] = max(1, int(shape[1] * seq_scale))
                sample[name] = random_array(rng, tuple(shape), e.dtype, opts.int_high)
            sample_sets.append(sample)
    merged = Comparison()
    for sample in sample_sets:
        try:
            ref = convert_torch.run_torch(model, kind, [sample[n] for n in in_names])
        except Exception as err:
            raise ConversionError(f"PyTorch fails on the sample inputs: {err}") from None
        got = run(sess, sample)
        merged.outputs.extend(compare(dict(zip(got, ref, strict=True)), got).outputs)
    return onnx_bytes, _worst(merged)


def _huggingface(src: Path, opts: ConvertOptions, opset: int, step: Step,
                 notes: list[str]) -> tuple[bytes, Comparison | None, list[Path], dict[str, int]]:
    if opts.exporter != "legacy" and opts.opset is None:
        opset = max(opset, min(convert_torch.DYNAMO_OPSET, choose_opset(None)))
    step(f"loading {src.name} with transformers and exporting it with torch.onnx (opset {opset})")
    result = convert_hf.export(src, opset, opts.task, exporter=opts.exporter, verify=opts.verify,
                               samples=opts.samples)
    notes.append(f"exported as {result.task} ({convert_hf.TASKS[result.task]}); model.yaml declares the pad "
                 f"values (input_ids: {result.pad_values['input_ids']}) so the batcher can join requests of "
                 "different lengths: set batching.max_batch_size to turn batching on")
    if result.side_files:
        notes.append("copied beside the model: " + ", ".join(sorted(f.name for f in result.side_files)))
    return result.onnx_bytes, result.comparison, result.side_files, result.pad_values


def _tabular(src: Path, opts: ConvertOptions, opset: int,
             step: Step) -> tuple[bytes, Comparison | None, dict[str, Any]]:
    step(f"loading {src.name}")
    model = convert_tabular.load_estimator(src)
    features = convert_tabular.n_features(model, opts.features)
    step(f"exporting a {type(model).__name__} ({convert_tabular.family(model)}, {features} features)")
    onnx_bytes = convert_tabular.export(model, features, opset)
    classifier = convert_tabular.is_classifier(model)
    spec: dict[str, Any] = {"_family": convert_tabular.family(model),
                            "task": "classification" if classifier else "tensor"}
    if classifier:
        spec["labels"] = [str(c) for c in model.classes_]
    if not opts.verify:
        return onnx_bytes, None, spec
    step("checking the ONNX model against the original")
    if opts.samples is not None:
        x = load_npz(opts.samples, ["features"])["features"]
    else:
        x = np.random.default_rng(1).standard_normal((256, features))
    x = np.asarray(x, dtype=np.float32)
    got = run(session(onnx_bytes), {"features": x})
    try:
        ref = convert_tabular.reference_outputs(model, x)
    except Exception as err:
        raise ConversionError(f"The original model fails on the sample inputs: {err}") from None
    return onnx_bytes, compare(ref, got), spec


def _samples_for(onnx_bytes: bytes, opts: ConvertOptions) -> dict[str, np.ndarray]:
    inputs, _ = graph_io(onnx.load_from_string(onnx_bytes))
    if opts.samples is not None:
        return load_npz(opts.samples, [i["name"] for i in inputs])
    return inputs_for_spec(inputs, high=opts.int_high)


def _worst(c: Comparison) -> Comparison:
    """One row per output name: the largest difference and the lowest agreement seen."""
    by_name: dict[str, Any] = {}
    for o in c.outputs:
        cur = by_name.get(o.name)
        if cur is None:
            by_name[o.name] = o
            continue
        if o.max_abs_diff is not None and (cur.max_abs_diff is None or o.max_abs_diff > cur.max_abs_diff):
            cur.max_abs_diff = o.max_abs_diff
        if o.agreement is not None and (cur.agreement is None or o.agreement < cur.agreement):
            cur.agreement = o.agreement
    return Comparison(list(by_name.values()))
