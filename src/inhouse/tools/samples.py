"""Sample inputs for conversion checks: parsed from ``--example-input``, read from an .npz,
or made up from a graph's input types."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inhouse.errors import ConversionError

_DTYPES = {
    "float32": np.float32, "fp32": np.float32, "float": np.float32, "float16": np.float16, "fp16": np.float16,
    "float64": np.float64, "fp64": np.float64, "int64": np.int64, "int32": np.int32, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}
_V2_TO_NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64,
                "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "UINT16": np.uint16,
                "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_}
_EXAMPLE = re.compile(r"^(?:(?P<name>[A-Za-z_][\w.:/-]*)=)?(?P<dims>\d+(?:x\d+)*)(?::(?P<dtype>\w+))?$")


@dataclass(frozen=True)
class ExampleInput:
    """One model input described on the command line: ``[NAME=]1x128[:int64]``."""

    name: str | None
    shape: tuple[int, ...]
    dtype: Any

    def make(self, rng: np.random.Generator, batch: int | None = None, high: int = 10) -> np.ndarray:
        shape = (batch, *self.shape[1:]) if batch is not None and self.shape else self.shape
        return random_array(rng, shape, self.dtype, high)


def parse_example_input(text: str) -> ExampleInput:
    m = _EXAMPLE.match(text.strip())
    if not m:
        raise ConversionError(
            f"--example-input '{text}' is not understood; write [NAME=]DIMxDIM[:DTYPE], e.g. "
            "shape=1x128:int64 or input_ids=1x128:int64."
        )
    dtype_name = (m["dtype"] or "float32").lower()
    if dtype_name not in _DTYPES:
        raise ConversionError(f"--example-input '{text}': unknown dtype '{dtype_name}'; use one of "
                              f"{', '.join(sorted(_DTYPES))}.")
    dims = tuple(int(d) for d in m["dims"].split("x"))
    if any(d < 1 for d in dims):
        raise ConversionError(f"--example-input '{text}': every dimension must be at least 1.")
    name = m["name"] if m["name"] not in (None, "shape") else None
    return ExampleInput(name, dims, _DTYPES[dtype_name])


def random_array(rng: np.random.Generator, shape: tuple[int, ...], dtype: Any, high: int = 10) -> np.ndarray:
    dt = np.dtype(dtype)
    if dt.kind == "b":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if dt.kind in "iu":
        return rng.integers(0, max(high, 1), shape).astype(dt)
    return rng.standard_normal(shape).astype(dt)


def inputs_for_spec(inputs: list[dict[str, Any]], batch: int = 4, dynamic: int = 8, seed: int = 0,
                    high: int = 10) -> dict[str, np.ndarray]:
    """Random inputs that match model.yaml tensors (first -1 → ``batch``, others → ``dynamic``)."""
    rng = np.random.default_rng(seed)
    out = {}
    for t in inputs:
        if t["dtype"] not in _V2_TO_NUMPY:
            raise ConversionError(f"Cannot make up sample data for input '{t['name']}' of type {t['dtype']}; "
                                  "pass real samples with --check FILE.npz.")
        shape = tuple((batch if i == 0 else dynamic) if d == -1 else d for i, d in enumerate(t["shape"]))
        out[t["name"]] = random_array(rng, shape, _V2_TO_NUMPY[t["dtype"]], high)
    return out


def load_npz(path: Path, input_names: list[str]) -> dict[str, np.ndarray]:
    """Read samples from .npz (keys = input names, or arr_0… in input order) or, for a
    one-input model, from .npy."""
    if not path.is_file():
        raise ConversionError(f"Sample file {path} does not exist.")
    try:
        if path.suffix == ".npy":
            if len(input_names) != 1:
                raise ConversionError(f"{path} holds one array but the model has inputs {input_names}; "
                                      "use an .npz with one array per input name.")
            return {input_names[0]: np.load(path, allow_pickle=False)}
        with np.load(path, allow_pickle=False) as npz:
            data = {k: npz[k] for k in npz.files}
    except (ValueError, OSError) as err:
        raise ConversionError(f"Cannot read samples from {path}: {err}") from None
    if all(k in data for k in input_names):
        return {k: data[k] for k in input_names}
    positional = [f"arr_{i}" for i in range(len(input_names))]
    if all(k in data for k in positional):
        return {n: data[k] for n, k in zip(input_names, positional, strict=True)}
    raise ConversionError(f"{path} has arrays {sorted(data)}, but the model needs inputs {input_names}.")
