"""The KServe v2 / Triton generate extension over REST, for chat and generate models:
``POST /v2/models/{m}[/versions/{v}]/generate`` (one JSON answer) and ``…/generate_stream``
(server-sent events, one per piece of text), as Triton's LLM clients call them.
https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_generate.md

Request: ``text_input`` (a raw prompt) or ``messages`` (chat messages, rendered with the
model's chat template; with optional ``tools``), ``parameters`` (``max_tokens``, ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop``, ``ignore_eos``, ``tool_choice``, ``priority``;
``stream`` only on generate_stream), optional ``id``. Answer: ``model_name``,
``model_version``, ``text_output`` (``reasoning_output``, ``tool_calls`` when there are any);
ours beside them, as in the gRPC stream's final response: ``finish_reason``,
``prompt_tokens``, ``completion_tokens``, ``cached_tokens``. Generation is the gRPC stream's
(``generate.py``), through ``llm/service.py``."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import Response

from inhouse.core.dataplane import DataPlane, parse_version
from inhouse.core.json_doc import json_object
from inhouse.errors import InvalidRequestError, ModelNotFoundError
from inhouse.llm.chat import normalize_tools
from inhouse.llm.service import LLMService
from inhouse.protocols.errors import as_inhouse_error
from inhouse.protocols.http_body import read_body
from inhouse.protocols.kserve_v2.generate import Generation, Piece, generation_pieces
from inhouse.protocols.llm_http import first_and_rest, json_response, sse_data, sse_response, until_disconnected
from inhouse.protocols.openai import map_content
from inhouse.security.pii import PieceTexts
from inhouse.security.pipeline import Guard, TextFn, Texts, guarded, map_all_texts
from inhouse.security.policy import tool_names

log = logging.getLogger(__name__)

_KNOWN = frozenset({"id", "text_input", "messages", "tools", "parameters"})
_TEXT_OUTPUTS = ("text_output", "reasoning_output")


# ---- what the security layer reads ------------------------------------------------------------
def map_generate_texts(doc: Any, fn: TextFn) -> None:
    """The texts of a generate request: ``text_input`` and the messages' contents, read as the
    OpenAI adapter reads a message's content (strings, text parts, nested tool results)."""
    if not isinstance(doc, dict):
        return
    if "text_input" in doc:
        doc["text_input"] = map_content(doc["text_input"], fn)
    messages = doc.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict) and "content" in msg:
                msg["content"] = map_content(msg["content"], fn)


def generate_stream_texts(doc: Any, pieces: PieceTexts) -> list[Any]:
    """One generate_stream event: its text pieces go through ``pieces`` (a placeholder split
    between events is joined first); the event carrying ``finish_reason`` is the last."""
    if not isinstance(doc, dict):
        return [doc]
    final = "finish_reason" in doc
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if key in _TEXT_OUTPUTS and isinstance(value, str):
            out[key] = pieces.piece(key, value, final)
        else:
            out[key] = map_all_texts({key: value}, pieces.fn)[key]
    return [out]


def _offered_tools(doc: Any) -> list[str] | None:
    return tool_names(doc.get("tools")) if isinstance(doc, dict) else None


TEXTS = Texts(request=map_generate_texts, tools=_offered_tools, stream=generate_stream_texts)
GENERATE_GUARD = Guard("generate", "infer", model="path", texts=TEXTS)
GENERATE_STREAM_GUARD = Guard("generate.stream", "infer", model="path", texts=TEXTS)


# ---- parsing and rendering ---------------------------------------------------------------------
def parse_generation(doc: dict[str, Any], model: str, streaming: bool) -> Generation:
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise InvalidRequestError("'parameters' must be a JSON object, e.g. {\"max_tokens\": 64}.")
    if params.get("stream") is True and not streaming:
        raise InvalidRequestError(f"Parameter 'stream' is true; POST /v2/models/{model}/generate_stream for a "
                                  "streamed answer (generate answers once).")
    prompt = doc.get("text_input")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]  # Triton clients may send a one-element batch
    if prompt is not None and not isinstance(prompt, str):
        raise InvalidRequestError("'text_input' must be a string.")
    messages = doc.get("messages")
    if messages is not None and not isinstance(messages, list | str):
        raise InvalidRequestError("'messages' must be a JSON array of chat messages.")
    if prompt is None and messages is None:
        raise InvalidRequestError("The request needs 'text_input' (a prompt) or 'messages' (a chat).")
    if prompt is not None and messages is not None:
        raise InvalidRequestError("Send 'text_input' or 'messages', not both.")
    tools = doc.get("tools")
    priority = params.get("priority", 0)
    if not isinstance(priority, int) or isinstance(priority, bool) or priority < 0:
        raise InvalidRequestError("Parameter 'priority' must be a non-negative integer.")
    ignored = sorted(set(doc) - _KNOWN)
    if ignored:
        log.info("request fields accepted but ignored", extra={"model": model, "fields": ignored})
    return Generation(model=model, prompt=prompt, messages=messages,
                      tools=normalize_tools(tools) if tools is not None else None,
                      parameters=params, priority=priority)


def _header(model: str, version: str, request_id: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {"model_name": model, "model_version": version}
    if isinstance(request_id, str) and request_id:
        doc["id"] = request_id
    return doc


def _event(head: dict[str, Any], p: Piece) -> dict[str, Any]:
    value: Any = json.loads(p.text) if p.output == "tool_calls" else p.text
    return {**head, p.output: value, **p.parameters}


async def _collect(head: dict[str, Any], pieces: AsyncIterator[Piece]) -> dict[str, Any]:
    doc: dict[str, Any] = {**head, "text_output": ""}
    async for p in pieces:
        if p.output == "tool_calls":
            doc["tool_calls"] = json.loads(p.text)
        else:
            doc[p.output] = doc.get(p.output, "") + p.text
        doc.update(p.parameters)
    return doc


async def _events(head: dict[str, Any], pieces: AsyncIterator[Piece]) -> AsyncIterator[bytes]:
    """The SSE body; a failure after the answer began is one last ``{"error": …}`` event, as Triton sends."""
    try:
        async for p in pieces:
            yield sse_data(_event(head, p))
    except Exception as exc:
        yield sse_data({"error": str(as_inhouse_error(exc))})


def _model_version(dataplane: DataPlane, llm: LLMService, model: str, version: str | None) -> str:
    """The version a generation runs on: the serving one. The LLM engine serves the newest
    version only, so a path naming another is refused rather than silently answered by it."""
    v = parse_version(version)
    name = next((m.model for m in llm.served_models(("chat", "generate")) if m.id == model), model)
    if v is None:
        serving = dataplane.manager.serving().get(name)
        return str(serving[0].version) if serving else ""
    chosen = dataplane.manager.resolve(name, v)  # 1002 when that version is not serving
    newest = dataplane.manager.resolve(name)
    if chosen is not newest:
        raise ModelNotFoundError(f"Model '{model}' generates with its newest version ({newest.version}); "
                                 f"version {v} serves /infer only. Leave the version out or name {newest.version}.")
    return str(v)


def build_router(dataplane: DataPlane, llm: LLMService, max_request_bytes: int) -> APIRouter:
    router = APIRouter(tags=["KServe v2 generate"])

    async def start(request: Request, model: str, version: str | None,
                    streaming: bool) -> tuple[dict[str, Any], AsyncIterator[Piece]]:
        doc = json_object(await read_body(request, max_request_bytes))
        gen = parse_generation(doc, model, streaming)
        head = _header(model, _model_version(dataplane, llm, model, version), doc.get("id"))
        return head, generation_pieces(llm, gen)

    @router.post("/v2/models/{model}/generate", summary="Generate text (one answer)")
    @router.post("/v2/models/{model}/versions/{version}/generate", summary="Generate text with a version")
    @guarded(GENERATE_GUARD)
    async def generate(request: Request, model: str, version: str | None = None) -> Response:
        head, pieces = await start(request, model, version, streaming=False)
        return json_response(await until_disconnected(request, _collect(head, pieces)))

    @router.post("/v2/models/{model}/generate_stream", summary="Generate text, streamed as server-sent events")
    @router.post("/v2/models/{model}/versions/{version}/generate_stream",
                 summary="Generate text with a version, streamed as server-sent events")
    @guarded(GENERATE_STREAM_GUARD)
    async def generate_stream(request: Request, model: str, version: str | None = None) -> Response:
        head, pieces = await start(request, model, version, streaming=True)
        _, stream = await first_and_rest(pieces, request)  # errors before the first piece are real HTTP statuses
        return sse_response(_events(head, stream))

    return router
