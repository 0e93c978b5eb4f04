"""A bare KServe v2 ``ModelInfer`` as an ASGI app, for pyvoy (Envoy's HTTP/2 with an embedded Python
interpreter): what a Python server gets when Envoy, in C++ and on its own threads, does the
HTTP/2 work our gRPC front does in Python. ``bench/envoy_probe.py`` runs it beside inhouse.

Without ``FLOOR_ENVOY_MODEL`` every call gets a fixed answer (a floor, as ``floor_grpc.py`` is for
grpc.aio); with it (an ONNX file) each call is parsed, run once in onnxruntime (one thread, no
batching) and rendered: the least a real server does per call. No security, metrics or logs."""

from __future__ import annotations

import os
import struct
from typing import Any

import numpy as np

from floor_answer import RESPONSE
from inhouse.protocols.proto import grpc_service_pb2 as pb

_MODEL = os.environ.get("FLOOR_ENVOY_MODEL")
_DTYPES = {"FP32": np.float32, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32}


_SESSION: Any = None
if _MODEL:
    import onnxruntime as ort

    _opts = ort.SessionOptions()
    _opts.intra_op_num_threads = _opts.inter_op_num_threads = 1
    _SESSION = ort.InferenceSession(_MODEL, _opts, providers=["CPUExecutionProvider"])


def _infer(message: bytes) -> bytes:
    req = pb.ModelInferRequest.FromString(message)
    feed = {t.name: np.frombuffer(raw, _DTYPES[t.datatype]).reshape(tuple(t.shape))
            for t, raw in zip(req.inputs, req.raw_input_contents, strict=True)}
    names = [o.name for o in _SESSION.get_outputs()]
    resp = pb.ModelInferResponse(model_name=req.model_name, model_version="1", id=req.id)
    for name, value in zip(names, _SESSION.run(names, feed), strict=True):
        resp.outputs.add(name=name, datatype="FP32", shape=list(value.shape))
        resp.raw_output_contents.append(np.ascontiguousarray(value, np.float32).tobytes())
    out: bytes = resp.SerializeToString()
    return out


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        event = await receive()
        body += event.get("body", b"")
        if not event.get("more_body"):
            break
    message = _infer(body[5:]) if _SESSION is not None else RESPONSE
    await send({"type": "http.response.start", "status": 200, "trailers": True,
                "headers": [(b"content-type", b"application/grpc")]})
    await send({"type": "http.response.body", "body": struct.pack(">BI", 0, len(message)) + message,
                "more_body": False})
    await send({"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False})
