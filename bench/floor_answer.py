"""The fixed ``ModelInferResponse`` every gRPC floor answers with (``floor_grpc.py`` on grpc.aio,
``floor_envoy.py`` behind Envoy): one FP32 [1, 2] output in ``raw_output_contents``. Only
protobuf is imported, so pyvoy's environment needs nothing more for it."""

from __future__ import annotations

from inhouse.protocols.proto import grpc_service_pb2 as pb


def _response() -> bytes:
    msg = pb.ModelInferResponse(model_name="floor", model_version="1")
    msg.outputs.add(name="y", datatype="FP32", shape=[1, 2])
    msg.raw_output_contents.append(b"\x00" * 8)
    out: bytes = msg.SerializeToString()
    return out


RESPONSE = _response()
