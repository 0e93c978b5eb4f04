"""KServe Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), with the
model-repository extension and bidirectional streaming. Each RPC parses, calls the data
plane, and renders; errors map once, in ``protocols/errors.py``."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import json_format

from inhouse.core.dataplane import DataPlane, parse_version
from inhouse.core.load_params import load_overrides
from inhouse.core.manager import IndexEntry
from inhouse.errors import InvalidRequestError
from inhouse.llm.service import LLMService
from inhouse.protocols.errors import grpc_abort
from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.protocols.v2_generate import generation_stream, is_generation_request, stream_error
from inhouse.protocols.v2_grpc import parameters_dict, parse_infer_request, render_infer_response

SERVICE_NAME = "inference.GRPCInferenceService"
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")
_Handler = Callable[[Any, _Req, grpc.aio.ServicerContext], Awaitable[_Resp]]


def _unary(fn: _Handler[_Req, _Resp]) -> _Handler[_Req, _Resp]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: _Req, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await grpc_abort(context, exc)
            raise  # unreachable: abort raises
    return wrapper


def _index_entry(e: IndexEntry) -> Any:
    return pb.RepositoryIndexResponse.ModelIndex(
        name=e.name, version="" if e.version is None else str(e.version), state=str(e.state), reason=e.reason,
    )


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``stream_window``: how many requests of one ModelStreamInfer call run at once (so a
    stream feeds the batcher without unbounded buffering)."""

    def __init__(self, dataplane: DataPlane, stream_window: int = 64, llm: LLMService | None = None) -> None:
        self._dp = dataplane
        self._stream_window = stream_window
        self._llm = llm

    # ---- health and metadata --------------------------------------------------------------
    @_unary
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self._dp.live())

    @_unary
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._dp.ready())

    @_unary
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        version = parse_version(request.version)
        ready = self._dp.model_ready(request.name, version)
        if not ready:
            self._dp.manager.repository.model_dir(request.name)  # unknown → NOT_FOUND, as REST
        return pb.ModelReadyResponse(ready=ready)

    @_unary
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self._dp.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @_unary
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self._dp.model_metadata(request.name, parse_version(request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
        )

    @_unary
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        cfg = self._dp.triton_model_config(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=json_format.ParseDict(cfg, pb.ModelConfig()))

    @_unary
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stats = self._dp.model_statistics(request.name, parse_version(request.version))
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    # ---- inference ----------------------------------------------------------------------------
    @_unary
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = parse_infer_request(request, context.time_remaining())
        resp = await self._dp.infer(req)
        return render_infer_response(resp, req)

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[Any],
                               context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        """Requests run concurrently; responses are written as they complete. At most
        ``stream_window`` requests are running or waiting to be sent at once, so a client that
        does not read its responses is not read from either (HTTP/2 flow control does the
        rest). A failed request yields ``error_message`` and the stream goes on; a client that
        half-closes gets every pending response, then the end of the stream."""
        done = object()
        results: asyncio.Queue[Any] = asyncio.Queue()
        window = asyncio.Semaphore(self._stream_window)
        pending: set[asyncio.Task[None]] = set()

        async def run_one(msg: Any) -> None:
            if self._llm is not None and is_generation_request(self._llm, msg):
                # a chat / generate model answers with one response per piece of text (decoupled)
                async for out, final in generation_stream(self._llm, msg, context.time_remaining()):
                    results.put_nowait((out, final))
                return
            try:
                req = parse_infer_request(msg, context.time_remaining())
                resp = await self._dp.infer(req)
                out = pb.ModelStreamInferResponse(infer_response=render_infer_response(resp, req))
            except Exception as exc:
                out = stream_error(msg, exc)
            results.put_nowait((out, True))

        async def read() -> None:
            try:
                async for msg in request_iterator:
                    await window.acquire()
                    task = asyncio.create_task(run_one(msg))
                    pending.add(task)
                    task.add_done_callback(pending.discard)
                while pending:
                    await asyncio.gather(*list(pending), return_exceptions=True)
            finally:
                results.put_nowait(done)

        reader = asyncio.create_task(read())
        try:
            while (item := await results.get()) is not done:
                out, final = item
                yield out
                if final:
                    window.release()  # only once sent: a client that stops reading stops being read
            await reader
        except Exception as exc:
            await grpc_abort(context, exc)
        finally:
            reader.cancel()
            for task in list(pending):
                task.cancel()

    # ---- model repository -----------------------------------------------------------------
    def _check_repository(self, name: str) -> None:
        root = self._dp.manager.repository.root
        if name and name != root.name:
            raise InvalidRequestError(
                f"Unknown repository '{name}'; this server has one, '{root.name}' (or leave the name empty)."
            )

    @_unary
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_repository(request.repository_name)
        entries = self._dp.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[_index_entry(e) for e in entries])

    @_unary
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_repository(request.repository_name)
        if not request.model_name:
            raise InvalidRequestError("RepositoryModelLoadRequest.model_name is empty; name the model to load.")
        overrides = load_overrides(parameters_dict(request.parameters), "Load parameter 'config'")
        await self._dp.load_model(request.model_name, overrides)
        return pb.RepositoryModelLoadResponse()

    @_unary
    async def RepositoryModelUnload(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_repository(request.repository_name)
        if not request.model_name:
            raise InvalidRequestError("RepositoryModelUnloadRequest.model_name is empty; name the model to unload.")
        params = parameters_dict(request.parameters)
        # tritonclient always sends unload_dependents; inhouse has no ensembles, so it changes nothing.
        unknown = [k for k in params if k != "unload_dependents"]
        if unknown:
            raise InvalidRequestError(f"Unsupported unload parameter(s) {unknown}.")
        await self._dp.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()
