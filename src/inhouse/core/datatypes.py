"""KServe v2 datatypes and their numpy / ONNX equivalents, plus tensor (de)serialisation
helpers shared by every protocol adapter."""

from __future__ import annotations

import struct
from typing import Any, Final

import numpy as np

from inhouse.errors import DatatypeError, ShapeError

V2_TO_NUMPY: Final[dict[str, np.dtype[Any]]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype(np.uint8),
    "UINT16": np.dtype(np.uint16),
    "UINT32": np.dtype(np.uint32),
    "UINT64": np.dtype(np.uint64),
    "INT8": np.dtype(np.int8),
    "INT16": np.dtype(np.int16),
    "INT32": np.dtype(np.int32),
    "INT64": np.dtype(np.int64),
    "FP16": np.dtype(np.float16),
    "FP32": np.dtype(np.float32),
    "FP64": np.dtype(np.float64),
    "BYTES": np.dtype(np.object_),
}
NUMPY_TO_V2: Final[dict[np.dtype[Any], str]] = {v: k for k, v in V2_TO_NUMPY.items()}

# ONNX element type names as onnxruntime reports them ("tensor(float)").
ONNX_TO_V2: Final[dict[str, str]] = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

DATATYPES: Final[tuple[str, ...]] = tuple(V2_TO_NUMPY)


def numpy_dtype(datatype: str) -> np.dtype[Any]:
    try:
        return V2_TO_NUMPY[datatype]
    except KeyError:
        raise DatatypeError(
            f"Datatype '{datatype}' is not a KServe v2 datatype; use one of {', '.join(DATATYPES)}."
        ) from None


def v2_datatype(dtype: np.dtype[Any]) -> str:
    if dtype.kind in ("U", "S", "O"):
        return "BYTES"
    try:
        return NUMPY_TO_V2[dtype]
    except KeyError:
        raise DatatypeError(f"numpy dtype {dtype} has no KServe v2 datatype.") from None


def element_count(shape: list[int] | tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def check_shape(name: str, shape: Any) -> list[int]:
    if type(shape) is list:  # a plain loop: this runs for every tensor of every request
        for d in shape:
            if type(d) is not int or d < 0:  # bool is not int here, as wanted
                break
        else:
            return shape
    raise ShapeError(
        f"Input '{name}' has shape {shape!r}; a shape must be a list of non-negative integers."
    )


def array_from_json(name: str, datatype: str, shape: list[int], data: Any) -> np.ndarray:
    """Build the array for a JSON tensor. ``data`` may be flat or nested (row-major)."""
    dtype = numpy_dtype(datatype)
    count = element_count(shape)
    if datatype == "BYTES":
        flat = _flatten(data)
        if len(flat) != count:
            raise ShapeError(_length_message(name, shape, count, len(flat)))
        out = np.empty(count, dtype=object)
        for i, item in enumerate(flat):
            if isinstance(item, str):
                out[i] = item.encode("utf-8")
            elif isinstance(item, bytes):
                out[i] = item
            else:
                raise DatatypeError(
                    f"Input '{name}' is BYTES, so its data must be strings; got {type(item).__name__}."
                )
        return out.reshape(shape)
    try:
        arr = np.asarray(data)
    except ValueError:
        raise ShapeError(f"Input '{name}' has ragged nested data; send a flat list instead.") from None
    if arr.dtype.kind == "f" and dtype.kind in ("i", "u") and dtype.itemsize == 8:
        arr = _big_integers(name, datatype, dtype, data, arr)
    if arr.dtype == object or arr.dtype.kind in ("U", "S"):
        raise DatatypeError(
            f"Input '{name}' is {datatype}, so its data must be numbers"
            f"{' or booleans' if datatype == 'BOOL' else ''}; got text, null or mixed values."
        )
    if datatype == "BOOL" and arr.dtype.kind not in ("b",) and arr.size:
        if arr.dtype.kind not in ("i", "u") or not np.isin(arr, (0, 1)).all():
            raise DatatypeError(f"Input '{name}' is BOOL, so its data must be true/false.")
    elif datatype != "BOOL" and arr.dtype.kind == "f" and dtype.kind in ("i", "u") and arr.size:
        raise DatatypeError(
            f"Input '{name}' is {datatype} but its data holds floating-point numbers; send integers."
        )
    if arr.size != count:
        raise ShapeError(_length_message(name, shape, count, arr.size))
    try:
        with np.errstate(over="raise", invalid="raise"):
            typed = arr.astype(dtype, casting="unsafe").reshape(shape)
    except (FloatingPointError, OverflowError):
        raise DatatypeError(f"Input '{name}' holds values out of range for {datatype}.") from None
    if dtype.kind in ("i", "u") and arr.dtype.kind in ("i", "u") and arr.size:
        info = np.iinfo(dtype)
        if arr.min() < info.min or arr.max() > info.max:
            raise DatatypeError(f"Input '{name}' holds values out of range for {datatype}.")
    return typed


def _big_integers(name: str, datatype: str, dtype: np.dtype[Any], data: Any, as_float: np.ndarray) -> np.ndarray:
    """numpy turns integers beyond int64 (e.g. UINT64 values ≥ 2**63) into float64, losing
    precision; read them exactly when every element really is an integer."""
    flat = _flatten(data) if isinstance(data, list) else [data]
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in flat):
        return as_float  # genuine floats: the caller reports them
    try:
        return np.array(flat, dtype=dtype).reshape(as_float.shape)
    except OverflowError:
        raise DatatypeError(f"Input '{name}' holds values out of range for {datatype}.") from None


def array_from_raw(name: str, datatype: str, shape: list[int], raw: bytes | memoryview, offset: int = 0,
                   size: int | None = None) -> np.ndarray:
    """The tensor in ``raw[offset:offset + size]`` (all of ``raw`` by default): a zero-copy view
    for fixed-size types, length-prefixed decoding for BYTES."""
    if size is None:
        size = len(raw) - offset
    dtype = V2_TO_NUMPY.get(datatype)
    if dtype is None:
        numpy_dtype(datatype)  # raises the 2003 with the list of datatypes
        raise AssertionError  # pragma: no cover
    count = 1
    for d in shape:
        count *= d
    if datatype == "BYTES":
        return deserialize_bytes(name, memoryview(raw)[offset:offset + size], count).reshape(shape)
    if size != count * dtype.itemsize:
        raise ShapeError(
            f"Input '{name}' carries {size} bytes of binary data, but shape {shape} of "
            f"{datatype} needs {count * dtype.itemsize} bytes."
        )
    return np.frombuffer(raw, dtype=dtype, count=count, offset=offset).reshape(shape)


def deserialize_bytes(name: str, raw: bytes | memoryview, count: int) -> np.ndarray:
    if count * 4 > len(raw):  # every element carries a 4-byte length; check before allocating
        raise ShapeError(
            f"Input '{name}' has {len(raw)} bytes of BYTES data, too few for the {count} "
            "length-prefixed elements its shape needs."
        )
    out = np.empty(count, dtype=object)
    view = memoryview(raw)
    pos, i, end = 0, 0, len(view)
    while pos < end:
        if pos + 4 > end or i >= count:
            break
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > end:
            raise ShapeError(f"Input '{name}' has a BYTES element running past the end of the data.")
        out[i] = bytes(view[pos:pos + length])
        pos += length
        i += 1
    if i != count or pos != end:
        raise ShapeError(
            f"Input '{name}' holds {i} length-prefixed BYTES elements "
            f"{'and trailing data ' if pos != end else ''}but its shape needs {count}."
        )
    return out


def serialize_bytes(arr: np.ndarray) -> bytes:
    parts: list[bytes] = []
    for item in arr.ravel():
        b = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def raw_bytes(arr: np.ndarray) -> bytes | memoryview:
    """The v2 binary representation of an array (row-major, little-endian)."""
    if arr.dtype.kind in ("O", "U", "S"):
        return serialize_bytes(arr)
    a = np.ascontiguousarray(arr)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.data).cast("B")


def json_data(arr: np.ndarray) -> Any:
    """Flat row-major data for a JSON response (orjson serialises numpy arrays natively)."""
    flat = arr.ravel()
    kind = flat.dtype.kind
    if kind in ("O", "S", "U"):
        return [_text(x) for x in flat.tolist()]
    if flat.dtype == np.float16:
        return flat.astype(np.float32)
    if not flat.flags.c_contiguous:
        flat = np.ascontiguousarray(flat)
    return flat


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            return x.decode("latin-1")
    return str(x)


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    if not data or not isinstance(data[0], list):
        return data
    out: list[Any] = []

    def walk(x: Any) -> None:
        if isinstance(x, list):
            for y in x:
                walk(y)
        else:
            out.append(x)
    walk(data)
    return out


def _length_message(name: str, shape: list[int], count: int, got: int) -> str:
    return (
        f"Input '{name}' has {got} elements of data but shape {shape} needs {count}; "
        "make the data length equal the product of the shape."
    )
