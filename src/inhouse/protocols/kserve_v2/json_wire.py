"""KServe v2 REST wire format, including the binary tensor data extension:
``Inference-Header-Content-Length`` splits a body into a JSON header and raw tensor bytes."""

from __future__ import annotations

from typing import Any

import orjson

from inhouse.core.datatypes import array_from_json, array_from_raw, check_shape, json_data, raw_bytes
from inhouse.core.types import InferRequest, InferResponse, InputTensor, RequestedOutput
from inhouse.errors import DatatypeError, InvalidRequestError, ShapeError

HEADER_LENGTH = "inference-header-content-length"


def _loads(raw: bytes | memoryview) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequestError(f"Request body is not valid JSON: {err}.") from None


def _priority(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidRequestError(f"Parameter 'priority' must be a non-negative integer, not {value!r}.")
    return value


def _timeout_s(params: dict[str, Any]) -> float | None:
    # 'timeout' follows Triton's convention (microseconds); 'timeout_ms' is ours.
    for key, scale in (("timeout_ms", 1e-3), ("timeout", 1e-6)):
        value = params.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            raise InvalidRequestError(f"Parameter '{key}' must be a positive number, not {value!r}.")
        return float(value) * scale
    return None


def parse_infer_request(body: bytes, header_length: str | None, model: str,
                        version: int | None) -> InferRequest:
    """A v2 infer request from a REST body: JSON, or (binary tensor data extension) a JSON
    header of ``header_length`` bytes followed by the tensors' raw bytes, which become
    zero-copy arrays over ``body``."""
    n = len(body)
    if header_length is not None:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidRequestError("Inference-Header-Content-Length is not an integer.") from None
        if n < 0 or n > len(body):
            raise InvalidRequestError(
                f"Inference-Header-Content-Length is {n} but the body has only {len(body)} bytes."
            )
        doc = _loads(body[:n])
    else:
        doc = _loads(body)
    if type(doc) is not dict:
        raise InvalidRequestError("Request body must be a JSON object with an 'inputs' list.")
    raw_inputs = doc.get("inputs")
    if type(raw_inputs) is not list or not raw_inputs:
        raise InvalidRequestError("Request must have a non-empty 'inputs' list.")
    params = doc.get("parameters")
    if params is None:
        params = {}
    elif type(params) is not dict:
        raise InvalidRequestError("'parameters' must be a JSON object.")
    inputs: list[InputTensor] = []
    offset = n  # where the next input's binary data starts in the body
    for i, item in enumerate(raw_inputs):
        if type(item) is not dict:
            raise InvalidRequestError(f"inputs[{i}] must be an object with name, shape, datatype and data.")
        name = item.get("name")
        datatype = item.get("datatype")
        if type(name) is not str or not name:
            raise InvalidRequestError(f"inputs[{i}] needs a 'name' string.")
        if type(datatype) is not str:
            raise DatatypeError(f"Input '{name}' needs a 'datatype' such as FP32.")
        shape = check_shape(name, item.get("shape"))
        tparams = item.get("parameters")
        if tparams is None:
            tparams = {}
        elif type(tparams) is not dict:
            raise InvalidRequestError(f"Input '{name}': 'parameters' must be an object.")
        size = tparams.get("binary_data_size")
        if size is not None:
            if type(size) is not int or size < 0:
                raise InvalidRequestError(f"Input '{name}': binary_data_size must be a non-negative integer.")
            if offset + size > len(body):
                raise ShapeError(
                    f"Input '{name}' declares {size} bytes of binary data but only "
                    f"{len(body) - offset} remain in the body."
                )
            arr = array_from_raw(name, datatype, shape, body, offset, size)
            offset += size
        else:
            if "data" not in item:
                raise InvalidRequestError(f"Input '{name}' has neither 'data' nor binary_data_size.")
            arr = array_from_json(name, datatype, shape, item["data"])
        inputs.append(InputTensor(name, datatype, shape, arr, tparams))
    if offset != len(body):
        raise InvalidRequestError(
            f"The body carries {len(body) - offset} bytes of binary data no input claims."
        )
    outputs = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if type(raw_outputs) is not list:
            raise InvalidRequestError("'outputs' must be a list of {name, parameters} objects.")
        outputs = []
        for j, o in enumerate(raw_outputs):
            if type(o) is not dict or type(o.get("name")) is not str:
                raise InvalidRequestError(f"outputs[{j}] needs a 'name' string.")
            op = o.get("parameters") or {}
            if type(op) is not dict:
                raise InvalidRequestError(f"outputs[{j}].parameters must be an object.")
            b = op.get("binary_data")
            outputs.append(RequestedOutput(name=o["name"], binary=bool(b) if b is not None else None,
                                           parameters=op))
    req_id = doc.get("id")
    return InferRequest(
        model, inputs, version, str(req_id) if req_id is not None else None, outputs, params,
        _priority(params.get("priority")) if params else None, _timeout_s(params) if params else None,
    )


def render_infer_response(resp: InferResponse, req: InferRequest) -> tuple[bytes, dict[str, str]]:
    """Returns the body and extra headers (binary extension when any output is binary)."""
    default_binary = bool(req.parameters.get("binary_data_output", False))
    per_output = {o.name: o.binary for o in req.outputs or []}
    out_docs: list[dict[str, Any]] = []
    blobs: list[bytes | memoryview] = []
    for t in resp.outputs:
        binary = per_output.get(t.name)
        if binary is None:
            binary = default_binary
        doc: dict[str, Any] = {"name": t.name, "datatype": t.datatype, "shape": t.shape}
        if binary:
            blob = raw_bytes(t.data)
            doc["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            doc["data"] = json_data(t.data)
        out_docs.append(doc)
    body: dict[str, Any] = {"model_name": resp.model, "model_version": str(resp.version), "outputs": out_docs}
    if resp.id is not None:
        body["id"] = resp.id
    if resp.parameters:
        body["parameters"] = resp.parameters
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, {"content-type": "application/json"}
    return b"".join([header, *blobs]), {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(len(header)),
    }


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY)


