"""KServe v2 gRPC wire format: ``ModelInferRequest`` → InferRequest and InferResponse →
``ModelInferResponse``, with typed ``contents`` and ``raw_input_contents`` /
``raw_output_contents``. Translation only; validation against the model is the data plane's."""

from __future__ import annotations

from typing import Any, Final

import numpy as np

from inhouse.core.dataplane import parse_version
from inhouse.core.datatypes import array_from_raw, check_shape, element_count, numpy_dtype, raw_bytes
from inhouse.core.types import InferRequest, InferResponse, InputTensor, RequestedOutput
from inhouse.errors import DatatypeError, InvalidRequestError, ShapeError
from inhouse.protocols.kserve_v2.json_wire import _priority, _timeout_s
from inhouse.protocols.proto import grpc_service_pb2 as pb

# The typed field of InferTensorContents that carries each datatype (FP16 has none: raw only).
CONTENTS_FIELD: Final[dict[str, str]] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents", "UINT16": "uint_contents", "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
# The wire type of each typed field, for decoding without a Python loop over elements.
_FIELD_DTYPE: Final[dict[str, np.dtype[Any]]] = {
    "bool_contents": np.dtype(np.bool_), "int_contents": np.dtype(np.int32),
    "int64_contents": np.dtype(np.int64), "uint_contents": np.dtype(np.uint32),
    "uint64_contents": np.dtype(np.uint64), "fp32_contents": np.dtype(np.float32),
    "fp64_contents": np.dtype(np.float64),
}


def parameters_dict(params: Any) -> dict[str, Any]:
    """A protobuf ``map<string, InferParameter>`` (or ModelRepositoryParameter) as a dict."""
    out: dict[str, Any] = {}
    if not len(params):  # the usual case, and iterating an empty protobuf map is not free
        return out
    for key, value in params.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = getattr(value, which) if which is not None else None
    return out


def set_parameters(target: Any, params: dict[str, Any]) -> None:
    for key, value in params.items():
        p = target[key]
        if isinstance(value, bool):
            p.bool_param = value
        elif isinstance(value, int):
            if value >= 2**63:
                p.uint64_param = value
            else:
                p.int64_param = value
        elif isinstance(value, float):
            p.double_param = value
        else:
            p.string_param = str(value)


def _typed_array(tensor: Any, shape: list[int]) -> np.ndarray:
    name, datatype = tensor.name, tensor.datatype
    dtype = numpy_dtype(datatype)
    used = [f.name for f, _ in tensor.contents.ListFields()] if tensor.HasField("contents") else []
    count = element_count(shape)
    if datatype == "FP16":
        if used or count:
            raise DatatypeError(
                f"Input '{name}' is FP16, which has no typed contents field; send it in raw_input_contents."
            )
        return np.empty(shape, dtype)
    wanted = CONTENTS_FIELD[datatype]
    wrong = [f for f in used if f != wanted]
    if wrong:
        raise DatatypeError(
            f"Input '{name}' is {datatype}, so its data belongs in contents.{wanted}; the request "
            f"filled contents.{', contents.'.join(wrong)}."
        )
    values = getattr(tensor.contents, wanted)
    if len(values) != count:
        raise ShapeError(
            f"Input '{name}' has {len(values)} elements in contents.{wanted} but shape {shape} "
            f"needs {count}; make the data length equal the product of the shape."
        )
    if datatype == "BYTES":
        arr = np.empty(count, dtype=object)
        arr[:] = list(values)
        return arr.reshape(shape)
    wire = np.fromiter(values, dtype=_FIELD_DTYPE[wanted], count=count)
    if wire.dtype != dtype and wire.size:
        info = np.iinfo(dtype)
        if wire.min() < info.min or wire.max() > info.max:
            raise DatatypeError(f"Input '{name}' holds values out of range for {datatype}.")
    return wire.astype(dtype, copy=False).reshape(shape)


def parse_infer_request(msg: Any, timeout_s: float | None = None) -> InferRequest:
    """``timeout_s``: the client's gRPC deadline, if it set one; the earlier of it and the
    request's own ``timeout`` parameter applies."""
    if not msg.model_name:
        raise InvalidRequestError("ModelInferRequest.model_name is empty; name the model to run.")
    if not msg.inputs:
        raise InvalidRequestError("ModelInferRequest has no inputs.")
    raw = msg.raw_input_contents
    if raw and len(raw) != len(msg.inputs):
        raise InvalidRequestError(
            f"raw_input_contents has {len(raw)} entries but the request has {len(msg.inputs)} inputs; "
            "send one raw entry per input, in the order of 'inputs', or use typed contents for all."
        )
    inputs: list[InputTensor] = []
    for i, t in enumerate(msg.inputs):
        if not t.name:
            raise InvalidRequestError(f"inputs[{i}] has no name.")
        if not t.datatype:
            raise DatatypeError(f"Input '{t.name}' needs a datatype such as FP32.")
        shape = check_shape(t.name, list(t.shape))
        if raw:
            if t.HasField("contents") and t.contents.ListFields():
                raise InvalidRequestError(
                    f"Input '{t.name}' has typed contents while the request uses raw_input_contents; "
                    "use one or the other for all inputs."
                )
            arr = array_from_raw(t.name, t.datatype, shape, raw[i])
        else:
            arr = _typed_array(t, shape)
        inputs.append(InputTensor(name=t.name, datatype=t.datatype, shape=shape, data=arr,
                                  parameters=parameters_dict(t.parameters)))
    params = parameters_dict(msg.parameters)
    outputs = [RequestedOutput(name=o.name, parameters=parameters_dict(o.parameters)) for o in msg.outputs] or None
    timeout = _timeout_s(params)
    if timeout_s is not None:
        timeout = timeout_s if timeout is None else min(timeout, timeout_s)
    return InferRequest(
        model=msg.model_name, version=parse_version(msg.model_version), inputs=inputs, outputs=outputs,
        id=msg.id or None, parameters=params, priority=_priority(params.get("priority")), timeout_s=timeout,
    )


def render_infer_response(resp: InferResponse, req: InferRequest) -> Any:
    """Outputs go in raw_output_contents (what Triton does, and the fastest), unless the
    request sets parameter ``binary_data_output`` to false: then in typed contents."""
    msg = pb.ModelInferResponse(model_name=resp.model, model_version=str(resp.version), id=resp.id or "")
    if resp.parameters:
        set_parameters(msg.parameters, resp.parameters)
    typed = req.parameters.get("binary_data_output") is False
    for t in resp.outputs:
        out = msg.outputs.add(name=t.name, datatype=t.datatype, shape=t.shape)
        if typed:
            _set_contents(out, t.data)
        else:
            data = raw_bytes(t.data)
            msg.raw_output_contents.append(data if isinstance(data, bytes) else data.tobytes())
    return msg


def _set_contents(out: Any, arr: np.ndarray) -> None:
    field = CONTENTS_FIELD.get(out.datatype)
    if field is None:
        raise InvalidRequestError(
            f"Output '{out.name}' is {out.datatype}, which has no typed contents field; leave "
            "binary_data_output unset to receive it in raw_output_contents."
        )
    flat = arr.ravel()
    if out.datatype == "BYTES":
        values = [x if isinstance(x, bytes) else str(x).encode("utf-8") for x in flat.tolist()]
    else:
        values = flat.tolist()
    getattr(out.contents, field).extend(values)
