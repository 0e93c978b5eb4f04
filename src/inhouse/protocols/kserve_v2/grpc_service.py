"""KServe Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``), with the
model-repository extension and bidirectional streaming. Each RPC parses, calls the data
plane, and renders; errors map once, in ``protocols/errors.py``."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import json_format

from inhouse.core.dataplane import DataPlane, parse_version
from inhouse.core.load_params import load_overrides
from inhouse.core.manager import IndexEntry
from inhouse.errors import InvalidRequestError
from inhouse.llm.service import LLMService
from inhouse.protocols.cache_scope import headers_tenant
from inhouse.protocols.errors import grpc_abort, grpc_errors
from inhouse.protocols.kserve_v2.generate import generation_stream, is_generation_request, stream_error
from inhouse.protocols.kserve_v2.grpc_wire import parameters_dict, parse_infer_request, render_infer_response
from inhouse.protocols.proto import grpc_service_pb2 as pb
from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc
from inhouse.security.pipeline import READINESS, Exchange, Guard, Texts
from inhouse.security.policy import tool_names

SERVICE_NAME = "inference.GRPCInferenceService"


def _index_entry(e: IndexEntry) -> Any:
    return pb.RepositoryIndexResponse.ModelIndex(
        name=e.name, version="" if e.version is None else str(e.version), state=str(e.state), reason=e.reason,
    )


# ---- what the security layer reads: BYTES tensors of requests and answers, and each RPC's guard
def _raw_elements(blob: bytes) -> list[bytes] | None:
    """The elements of a raw BYTES tensor (each a 4-byte little-endian length, then the bytes),
    or None when the blob is malformed (the request is then refused when it is parsed)."""
    out, pos = [], 0
    while pos < len(blob):
        if pos + 4 > len(blob):
            return None
        n = int.from_bytes(blob[pos:pos + 4], "little")
        if pos + 4 + n > len(blob):
            return None
        out.append(blob[pos + 4:pos + 4 + n])
        pos += 4 + n
    return out


def _raw_blob(elements: list[bytes]) -> bytes:
    return b"".join(len(e).to_bytes(4, "little") + e for e in elements)


def _tensor_texts(request: Any, index: int) -> list[str]:
    """The elements of one BYTES input of a ModelInferRequest, as text (typed contents or raw)."""
    tensor = request.inputs[index]
    if getattr(tensor, "datatype", "") != "BYTES":
        return []
    texts = [b.decode("utf-8", "replace") for b in tensor.contents.bytes_contents]
    raw = getattr(request, "raw_input_contents", ())
    if index < len(raw):
        texts.extend(b.decode("utf-8", "replace") for b in _raw_elements(raw[index]) or ())
    return texts


def _bytes_texts(request: Any) -> list[str]:
    return [t for i in range(len(getattr(request, "inputs", ()) or ())) for t in _tensor_texts(request, i)]


def _element_fn(fn: Callable[[str], str]) -> Callable[[bytes], bytes]:
    """A text rule applied to one BYTES element. Bytes that are not UTF-8 survive unchanged
    (surrogate escapes), while the text around them is still inspected."""
    def apply(b: bytes) -> bytes:
        text = b.decode("utf-8", "surrogateescape")
        out = fn(text)
        return b if out == text else out.encode("utf-8", "surrogateescape")
    return apply


def map_bytes_tensors(tensors: Any, raw: Any, fn: Callable[[str, str], str]) -> None:
    """Rewrite, in place, every element of the BYTES tensors of a ModelInferRequest (``inputs``
    and ``raw_input_contents``) or ModelInferResponse (``outputs`` and ``raw_output_contents``)
    with ``fn(tensor name, text)``."""
    for i, tensor in enumerate(tensors):
        if tensor.datatype != "BYTES":
            continue
        apply = _element_fn(functools.partial(fn, tensor.name))
        values = tensor.contents.bytes_contents
        if len(values):
            new = [apply(b) for b in values]
            del values[:]
            values.extend(new)
        if i < len(raw):
            elements = _raw_elements(raw[i])
            if elements:
                raw[i] = _raw_blob([apply(e) for e in elements])


def offered_tools(request: Any) -> list[str] | None:
    """The tool names of a generation request's ``tools`` input (one BYTES element holding a
    JSON array), if it has one. Anything else in ``tools`` is refused when the request is
    parsed, before it reaches the model."""
    for i, tensor in enumerate(request.inputs):
        if tensor.name == "tools":
            texts = _tensor_texts(request, i)
            try:
                return tool_names(json.loads(texts[0])) if len(texts) == 1 else None
            except ValueError:
                return None
    return None


def map_request_texts(request: Any, fn: Callable[[str], str]) -> None:
    """The texts of a ModelInferRequest: the elements of its BYTES inputs."""
    map_bytes_tensors(request.inputs, request.raw_input_contents, lambda _name, text: fn(text))


def answer_texts(response: Any, exchange: Exchange) -> None:
    """A ModelInferResponse, or a ModelStreamInferResponse (one piece of a generation): its
    BYTES outputs through the model's rules; streamed ``text_output`` pieces are joined where a
    placeholder is split between them, per request id."""
    stream = hasattr(response, "error_message")
    msg = response.infer_response if stream else response
    rules = exchange.rules(msg.model_name) if msg.model_name else None
    if rules is None or not rules.changes_outputs:
        return
    if stream and response.error_message:
        held = exchange.held(msg.model_name)
        if held is not None:
            held.drop(msg.id)
        return
    if "triton_final_response" not in msg.parameters:  # a whole answer, not a piece of one
        map_bytes_tensors(msg.outputs, msg.raw_output_contents, lambda _name, text: rules.output(text))
        return
    pieces = exchange.pieces(msg.model_name, rules)
    final = msg.parameters["triton_final_response"].bool_param
    map_bytes_tensors(msg.outputs, msg.raw_output_contents, lambda name, text: pieces.piece(
        msg.id, text, final) if name == "text_output" else rules.output(text))
    if final:
        pieces.drop(msg.id)


def request_size(request: Any) -> int:
    return int(request.ByteSize()) if hasattr(request, "ByteSize") else 0


TEXTS = Texts(request=map_request_texts, tools=offered_tools, answer=answer_texts)
_RPC = f"/{SERVICE_NAME}/"
RPC_GUARDS: dict[str, Guard] = {
    _RPC + "ServerLive": Guard("health.live", "open"),
    _RPC + "ServerReady": READINESS,
    _RPC + "ServerMetadata": Guard("server.metadata", "infer"),
    _RPC + "ModelReady": Guard("model.ready", "infer", model="name"),
    _RPC + "ModelMetadata": Guard("model.metadata", "infer", model="name"),
    _RPC + "ModelConfig": Guard("model.config", "infer", model="name"),
    _RPC + "ModelStatistics": Guard("model.statistics", "infer", model="name", every_model=True),
    _RPC + "ModelInfer": Guard("infer", "infer", model="model_name", texts=TEXTS),
    _RPC + "ModelStreamInfer": Guard("infer.stream", "infer", model="model_name", texts=TEXTS),
    _RPC + "RepositoryIndex": Guard("repository.index", "admin"),
    _RPC + "RepositoryModelLoad": Guard("repository.load", "admin", model="model_name"),
    _RPC + "RepositoryModelUnload": Guard("repository.unload", "admin", model="model_name"),
}
"""What each RPC of the service needs of the security layer (its scope, the request field
naming the model, the texts its messages carry)."""


class InferenceServicer(pb_grpc.GRPCInferenceServiceServicer):
    """``stream_window``: how many requests of one ModelStreamInfer call run at once (so a
    stream feeds the batcher without unbounded buffering)."""

    def __init__(self, dataplane: DataPlane, stream_window: int = 64, llm: LLMService | None = None) -> None:
        self._dp = dataplane
        self._stream_window = stream_window
        self._llm = llm

    # ---- health and metadata --------------------------------------------------------------
    @grpc_errors
    async def ServerLive(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerLiveResponse(live=self._dp.live())

    @grpc_errors
    async def ServerReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return pb.ServerReadyResponse(ready=self._dp.ready())

    @grpc_errors
    async def ModelReady(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        version = parse_version(request.version)
        ready = self._dp.model_ready(request.name, version)
        if not ready:
            self._dp.manager.repository.model_dir(request.name)  # unknown → NOT_FOUND, as REST
        return pb.ModelReadyResponse(ready=ready)

    @grpc_errors
    async def ServerMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self._dp.server_metadata()
        return pb.ServerMetadataResponse(name=meta["name"], version=meta["version"], extensions=meta["extensions"])

    @grpc_errors
    async def ModelMetadata(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        meta = self._dp.model_metadata(request.name, parse_version(request.version))
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
        )

    @grpc_errors
    async def ModelConfig(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        cfg = self._dp.triton_model_config(request.name, parse_version(request.version))
        return pb.ModelConfigResponse(config=json_format.ParseDict(cfg, pb.ModelConfig()))

    @grpc_errors
    async def ModelStatistics(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        stats = self._dp.model_statistics(request.name, parse_version(request.version))
        return json_format.ParseDict({"model_stats": stats}, pb.ModelStatisticsResponse())

    # ---- inference ----------------------------------------------------------------------------
    @grpc_errors
    async def ModelInfer(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        req = parse_infer_request(request, context.time_remaining())
        req.cache_tenant = _metadata_tenant(context)
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
        tenant = _metadata_tenant(context)
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
                req.cache_tenant = tenant
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

    @grpc_errors
    async def RepositoryIndex(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_repository(request.repository_name)
        entries = self._dp.repository_index(ready_only=request.ready)
        return pb.RepositoryIndexResponse(models=[_index_entry(e) for e in entries])

    @grpc_errors
    async def RepositoryModelLoad(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._check_repository(request.repository_name)
        if not request.model_name:
            raise InvalidRequestError("RepositoryModelLoadRequest.model_name is empty; name the model to load.")
        overrides = load_overrides(parameters_dict(request.parameters), "Load parameter 'config'")
        await self._dp.load_model(request.model_name, overrides)
        return pb.RepositoryModelLoadResponse()

    @grpc_errors
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


def _metadata_tenant(context: grpc.aio.ServicerContext) -> str | None:
    """The response-cache tenant of an RPC, from its metadata (``protocols.cache_scope``)."""
    md = context.invocation_metadata() or ()
    return headers_tenant({k: v for k, v in md if isinstance(v, str)})
