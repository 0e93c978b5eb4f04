"""PyTorch → ONNX: TorchScript files, whole pickled ``nn.Module``s and ``torch.export``
programs (.pt2), exported with dynamic batch (and sequence) axes."""

from __future__ import annotations

import io
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from inhouse.errors import ConversionError
from inhouse.tools.extras import require
from inhouse.tools.samples import ExampleInput

log = logging.getLogger(__name__)
DYNAMO_OPSET = 18  # the torch.export-based exporter emits this opset natively


def load_module(src: Path) -> tuple[Any, str]:
    """(model, kind) where kind is 'script', 'module' or 'exported'."""
    torch = require("torch", "convert-torch")
    if src.suffix == ".pt2":
        try:
            return torch.export.load(str(src)), "exported"
        except Exception as err:
            raise ConversionError(f"{src} is not a torch.export program: {err}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TorchScript files are still a common export
            return torch.jit.load(str(src), map_location="cpu").eval(), "script"
    except Exception:  # noqa: S110 - not TorchScript: try a pickled module next
        pass
    try:
        # A pickled module runs code while loading: the file must come from the user's own training.
        obj = torch.load(str(src), map_location="cpu", weights_only=False)
    except Exception as err:
        raise ConversionError(f"{src} is neither TorchScript nor a saved PyTorch module: {err}") from None
    if isinstance(obj, torch.nn.Module):
        return obj.eval(), "module"
    if isinstance(obj, dict):
        raise ConversionError(
            f"{src} holds only weights (a state_dict), not the model's code. Save the whole module "
            "(torch.save(model, 'model.pt')) or TorchScript (torch.jit.script(model).save('model.pt')) "
            "and convert that."
        )
    raise ConversionError(f"{src} holds a {type(obj).__name__}, not a PyTorch module.")


def _names(examples: list[ExampleInput], output_names: list[str] | None, n_out: int) -> tuple[list[str], list[str]]:
    if len(examples) == 1:
        ins = [examples[0].name or "input"]
    else:
        ins = [e.name or f"input_{i}" for i, e in enumerate(examples)]
    if output_names:
        if len(output_names) != n_out:
            raise ConversionError(f"--output-names gives {len(output_names)} names but the model returns "
                                  f"{n_out} outputs.")
        outs = output_names
    else:
        outs = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    return ins, outs


def flatten_outputs(value: Any) -> list[Any]:
    torch = require("torch", "convert-torch")
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in flatten_outputs(v)]
    if isinstance(value, list | tuple):
        return [t for v in value for t in flatten_outputs(v)]
    if hasattr(value, "to_tuple"):  # transformers ModelOutput
        return flatten_outputs(value.to_tuple())
    raise ConversionError(f"The model returns a {type(value).__name__}; only tensors (or tuples/dicts of "
                          "tensors) can be exported.")


def run_torch(model: Any, kind: str, arrays: list[np.ndarray]) -> list[np.ndarray]:
    torch = require("torch", "convert-torch")
    args = tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in arrays)
    fn = model.module() if kind == "exported" else model
    with torch.no_grad():
        out = fn(*args)
    return [t.detach().cpu().numpy() for t in flatten_outputs(out)]


def export(model: Any, kind: str, examples: list[ExampleInput], opset: int, *, exporter: str = "auto",
           output_names: list[str] | None = None, sequence_axis: bool = True,
           ) -> tuple[bytes, list[str], list[str], dict[str, dict[int, str]]]:
    """Export to ONNX bytes; returns (bytes, input names, output names, dynamic axes)."""
    torch = require("torch", "convert-torch")
    rng = np.random.default_rng(0)
    # Trace with batch ≥ 2 so the exporter does not specialise the batch dimension to 1.
    arrays = [e.make(rng, batch=max(2, e.shape[0]) if e.shape else None) for e in examples]
    try:
        n_out = len(run_torch(model, kind, arrays))
    except ConversionError:
        raise
    except Exception as err:
        raise ConversionError(f"The model fails on the example inputs {[a.shape for a in arrays]}: {err}") from None
    in_names, out_names = _names(examples, output_names, n_out)
    axes: dict[str, dict[int, str]] = {}
    for name, e in zip(in_names, examples, strict=True):
        a: dict[int, str] = {0: "batch"} if e.shape else {}
        if sequence_axis and len(e.shape) >= 2 and np.dtype(e.dtype).kind in "iu":
            a[1] = "sequence"
        axes[name] = a
    for name in out_names:
        axes[name] = {0: "batch"}
    use_dynamo = exporter == "dynamo" or (exporter == "auto" and kind != "script" and opset >= DYNAMO_OPSET)
    if exporter == "dynamo" and opset < DYNAMO_OPSET:
        raise ConversionError(f"The dynamo exporter writes opset {DYNAMO_OPSET} or newer; choose --opset "
                              f"{DYNAMO_OPSET}+ or --exporter legacy.")
    target = model.module() if kind == "exported" and not use_dynamo else model
    onnx_bytes = export_module(target, [torch.from_numpy(a) for a in arrays], in_names, out_names, axes, opset,
                               use_dynamo)
    return onnx_bytes, in_names, out_names, axes


def export_module(module: Any, args: list[Any], in_names: list[str], out_names: list[str],
                  axes: dict[str, dict[int, str]], opset: int, use_dynamo: bool) -> bytes:
    """``torch.onnx.export`` of ``module`` called on ``args`` with the given names and dynamic
    axes, to ONNX bytes (weights inside); exporter failures become ConversionError (1007)."""
    torch = require("torch", "convert-torch")
    buf = io.BytesIO()
    dynamic = {k: v for k, v in axes.items() if v}
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # exporter chatter (optional torchvision ops …)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if use_dynamo:
                program = torch.onnx.export(module, tuple(args), None, dynamo=True, input_names=in_names,
                                            output_names=out_names, opset_version=opset, dynamic_axes=dynamic,
                                            verbose=False)
                program.save(buf, external_data=False)
            else:
                torch.onnx.export(module, tuple(args), buf, dynamo=False, input_names=in_names,
                                  output_names=out_names, opset_version=opset, dynamic_axes=dynamic)
    except ConversionError:
        raise
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        hint = " Try --exporter legacy." if use_dynamo else ""
        raise ConversionError(f"torch.onnx.export failed: {first}.{hint}") from None
    return buf.getvalue()
