"""The gRPC floor: a bare server that answers every KServe v2 ``ModelInfer`` with a fixed, small
``ModelInferResponse`` (one FP32 [1, 2] output in ``raw_output_contents``), on the same grpcio
and event loop inhouse uses. Nothing served over the same stack can be faster; ``bench/run.py
--transport grpc`` measures it in the same run as a reference.

    python bench/floor_grpc.py PORT [--sync]   # --sync: grpc.server with a thread pool instead
"""

from __future__ import annotations

import argparse
import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc

from floor_answer import RESPONSE

_METHOD = "ModelInfer"
_SERVICE = "inference.GRPCInferenceService"


def _handlers(behavior: Any) -> grpc.GenericRpcHandler:
    # raw bytes in and out: the floor pays for no protobuf parsing in Python at all
    return grpc.method_handlers_generic_handler(_SERVICE, {_METHOD: grpc.unary_unary_rpc_method_handler(behavior)})


async def serve_aio(port: int) -> None:
    async def infer(request: bytes, context: Any) -> bytes:
        return RESPONSE

    server = grpc.aio.server()
    server.add_generic_rpc_handlers((_handlers(infer),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def serve_sync(port: int) -> None:
    def infer(request: bytes, context: Any) -> bytes:
        return RESPONSE

    server = grpc.server(ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((_handlers(infer),))
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("port", type=int)
    p.add_argument("--sync", action="store_true", help="grpc.server and a thread pool instead of grpc.aio")
    args = p.parse_args()
    if args.sync:
        serve_sync(args.port)
        return
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve_aio(args.port))
    else:
        uvloop.run(serve_aio(args.port))


if __name__ == "__main__":
    main()
