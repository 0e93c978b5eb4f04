"""The Anthropic Messages API (https://docs.anthropic.com/en/api/messages): ``POST
/v1/messages`` (JSON and streaming events) and ``/v1/messages/count_tokens``. Anthropic
messages are translated into the same chat requests the OpenAI adapter makes."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import InvalidRequestError
from inhouse.llm.chat import normalize_messages, normalize_tools
from inhouse.llm.events import (
    ChoiceEnd,
    Event,
    Prompt,
    ReasoningDelta,
    TextDelta,
    ToolCallArgs,
    ToolCallStart,
    Usage,
    aggregate,
)
from inhouse.llm.requests import ChatRequest, JsonFormat
from inhouse.llm.service import LLMService
from inhouse.llm.types import SamplingParams
from inhouse.protocols import openai
from inhouse.protocols.cache_scope import headers_tenant
from inhouse.protocols.errors import anthropic_error_body, as_inhouse_error
from inhouse.protocols.llm_http import (
    LenientModel,
    first_and_rest,
    json_response,
    parse_json_model,
    sse_event,
    sse_response,
    until_disconnected,
)
from inhouse.security.pii import PieceTexts
from inhouse.security.pipeline import Guard, Texts, guarded, map_all_texts


class MessagesBody(LenientModel):
    """https://docs.anthropic.com/en/api/messages, in the reference's order."""

    model: str
    messages: list[Any]
    max_tokens: int = Field(ge=1)
    metadata: dict[str, Any] | None = None
    output_config: dict[str, Any] | None = None
    stop_sequences: list[str] | None = None
    stream: bool = False
    system: str | list[Any] | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    thinking: dict[str, Any] | None = None
    tool_choice: dict[str, Any] | None = None
    tools: list[Any] | None = None
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)


class CountTokensBody(LenientModel):
    model: str
    messages: list[Any]
    system: str | list[Any] | None = None
    tools: list[Any] | None = None
    thinking: dict[str, Any] | None = None


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise InvalidRequestError(f"{where}.content must be a string or an array of content blocks.",
                                  details={"param": f"{where}.content"})
    out = []
    for i, b in enumerate(content):
        if not isinstance(b, dict) or not isinstance(b.get("type"), str):
            raise InvalidRequestError(f"{where}.content[{i}] must be a block with a 'type'.",
                                      details={"param": f"{where}.content[{i}]"})
        out.append(b)
    return out


def _image_url(source: Any) -> str:
    """An Anthropic image source as an OpenAI image URL: base64 data becomes a data URL."""
    if isinstance(source, dict) and source.get("type") == "base64":
        return f"data:{source.get('media_type', 'image/png')};base64,{source.get('data', '')}"
    if isinstance(source, dict) and isinstance(source.get("url"), str):
        return str(source["url"])
    return ""


def _text_of(content: Any, where: str) -> list[Any]:
    """Tool-result content → OpenAI-style parts (text; images kept so they are refused)."""
    parts: list[Any] = []
    for b in _blocks(content, where) if content is not None else []:
        if b["type"] == "text":
            parts.append({"type": "text", "text": b.get("text", "")})
        else:
            parts.append({"type": "image_url" if b["type"] == "image" else b["type"]})
    return parts


def to_openai_messages(system: Any, messages: list[Any]) -> list[dict[str, Any]]:
    """Anthropic system + messages → OpenAI-form messages (then normalised like any chat)."""
    out: list[dict[str, Any]] = []
    if system:
        sys_text = system if isinstance(system, str) else "\n".join(
            b.get("text", "") for b in _blocks(system, "system") if b["type"] == "text")
        out.append({"role": "system", "content": sys_text})
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ("user", "assistant"):
            raise InvalidRequestError(f"{where}.role must be 'user' or 'assistant'.",
                                      details={"param": f"{where}.role"})
        blocks = _blocks(m.get("content"), where)
        if m["role"] == "assistant":
            text, thinking, calls = [], [], []
            for b in blocks:
                if b["type"] == "text":
                    text.append(b.get("text", ""))
                elif b["type"] == "thinking":
                    thinking.append(b.get("thinking", ""))
                elif b["type"] == "tool_use":
                    calls.append({"id": b.get("id"), "type": "function",
                                  "function": {"name": b.get("name"), "arguments": b.get("input") or {}}})
            msg: dict[str, Any] = {"role": "assistant", "content": "".join(text) or None}
            if thinking:
                msg["reasoning_content"] = "".join(thinking)
            if calls:
                msg["tool_calls"] = calls
            out.append(msg)
            continue
        parts: list[Any] = []
        for j, b in enumerate(blocks):
            if b["type"] == "tool_result":
                content = _text_of(b.get("content"), f"{where}.content[{j}]")
                out.append({"role": "tool", "tool_call_id": b.get("tool_use_id"), "content": content})
            elif b["type"] == "text":
                parts.append({"type": "text", "text": b.get("text", "")})
            elif b["type"] == "image":  # base64 sources as data URLs; others are refused with a clear message
                parts.append({"type": "image_url", "image_url": {"url": _image_url(b.get("source"))}})
            else:  # document, ...: refused by normalize_messages with a clear message
                parts.append({"type": b["type"]})
        if parts:
            out.append({"role": "user", "content": parts})
    return out


def _tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    if tools is None:
        return None
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise InvalidRequestError(f"tools[{i}] must have a 'name' and an 'input_schema'.",
                                      details={"param": f"tools[{i}]"})
        fn: dict[str, Any] = {"name": t["name"], "parameters": t.get("input_schema") or {"type": "object"}}
        if t.get("description") is not None:
            fn["description"] = t["description"]
        converted.append({"type": "function", "function": fn})
    return normalize_tools(converted)


def _tool_choice(choice: dict[str, Any] | None) -> tuple[str, bool]:
    if choice is None:
        return "auto", True
    parallel = not choice.get("disable_parallel_tool_use", False)
    kind = choice.get("type")
    if kind in ("auto", "none"):
        return kind, parallel
    if kind == "any":
        return "required", parallel
    if kind == "tool" and isinstance(choice.get("name"), str):
        return choice["name"], parallel
    raise InvalidRequestError("tool_choice must be {\"type\": \"auto\" | \"any\" | \"none\"} or "
                              "{\"type\": \"tool\", \"name\": ...}.", details={"param": "tool_choice"})


def _template_kwargs(thinking: dict[str, Any] | None) -> dict[str, Any]:
    if not thinking:
        return {}
    return {"enable_thinking": thinking.get("type") in ("enabled", "adaptive")}


def _output_format(config: dict[str, Any] | None) -> JsonFormat | None:
    """``output_config.format`` (structured outputs) → constrained JSON."""
    fmt = (config or {}).get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict):
        raise InvalidRequestError('output_config.format must be {"type": "json_schema", "schema": {...}}.',
                                  details={"param": "output_config.format"})
    return JsonFormat(fmt["schema"])


def messages_request(body: MessagesBody) -> ChatRequest:
    tools = _tools(body.tools)
    choice, parallel = _tool_choice(body.tool_choice)
    if choice not in ("auto", "none") and not tools:
        raise InvalidRequestError("tool_choice needs 'tools' to choose from.", details={"param": "tool_choice"})
    return ChatRequest(
        model=body.model,
        messages=normalize_messages(to_openai_messages(body.system, body.messages), body.model),
        sampling=SamplingParams(
            max_tokens=body.max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=body.top_p or 1.0, top_k=body.top_k or 0, stop=[s for s in body.stop_sequences or [] if s]),
        tools=tools, tool_choice=choice, parallel_tool_calls=parallel,
        response_format=_output_format(body.output_config),
        template_kwargs=_template_kwargs(body.thinking),
    )


def _stop_reason(finish: str, stop_string: str | None) -> str:
    if finish == "tool_calls":
        return "tool_use"
    if finish == "length":
        return "max_tokens"
    return "stop_sequence" if stop_string else "end_turn"


def _usage(u: Usage) -> dict[str, Any]:
    return {"input_tokens": u.prompt_tokens, "output_tokens": u.completion_tokens,
            "cache_read_input_tokens": u.cached_tokens, "cache_creation_input_tokens": 0}


def _input(arguments: str) -> Any:
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


# ---- what the security layer reads: request texts as OpenAI's, and streamed events --------
def stream_texts(doc: Any, pieces: PieceTexts) -> list[Any]:
    """One streamed event: a text delta goes through ``pieces`` per content block; text held
    back at the end of a block is flushed in an extra delta before the block stops."""
    if not isinstance(doc, dict):
        return [doc]
    kind, key, delta = doc.get("type"), f"a{doc.get('index', 0)}", doc.get("delta")
    if kind == "content_block_delta" and isinstance(delta, dict) and isinstance(delta.get("text"), str):
        delta["text"] = pieces.piece(key, delta["text"], False)
    elif kind == "content_block_stop" and key in pieces.held:
        flush = {"type": "content_block_delta", "index": doc.get("index", 0),
                 "delta": {"type": "text_delta", "text": pieces.piece(key, "", True)}}
        return [flush, map_all_texts(doc, pieces.fn)]
    return [map_all_texts(doc, pieces.fn)]


TEXTS = Texts(request=openai.map_request_texts, tools=openai.request_tools, stream=stream_texts)


class AnthropicRoutes:
    def __init__(self, service: LLMService, max_request_bytes: int) -> None:
        self.service = service
        self.limit = max_request_bytes

    @guarded(Guard("messages", "infer", model="model", texts=TEXTS))
    async def messages(self, request: Request) -> Response:
        body = await parse_json_model(request, MessagesBody, self.limit)
        self.service.require_model(body.model)  # an unknown model says so before its messages are judged
        req = messages_request(body)
        req.cache_tenant = headers_tenant(request.headers)
        mid = "msg_" + uuid.uuid4().hex[:24]
        events = self.service.chat(req)
        if body.stream:
            _, stream = await first_and_rest(events, request)
            return sse_response(self._stream(stream, mid, body.model))
        collected = await until_disconnected(request, _collect(events))
        done = aggregate(collected, 1)
        c = done.choices[0]
        content: list[dict[str, Any]] = []
        if c.reasoning:
            content.append({"type": "thinking", "thinking": c.reasoning, "signature": ""})
        if c.text:
            content.append({"type": "text", "text": c.text})
        for t in c.tool_calls:
            content.append({"type": "tool_use", "id": t.id, "name": t.name, "input": _input(t.arguments)})
        return json_response({"id": mid, "type": "message", "role": "assistant", "model": body.model,
                              "content": content, "stop_reason": _stop_reason(c.finish_reason, c.stop_string),
                              "stop_sequence": c.stop_string, "usage": _usage(done.usage)})

    async def _stream(self, events: AsyncIterator[Event], mid: str, model: str) -> AsyncIterator[bytes]:
        block = -1
        kind: str | None = None  # "thinking" | "text" | "tool:<n>"
        end: ChoiceEnd | None = None
        try:
            async for ev in events:
                if isinstance(ev, Prompt):
                    yield sse_event("message_start", {"type": "message_start", "message": {
                        "id": mid, "type": "message", "role": "assistant", "model": model, "content": [],
                        "stop_reason": None, "stop_sequence": None,
                        "usage": {"input_tokens": ev.prompt_tokens, "output_tokens": 0}}})
                    yield sse_event("ping", {"type": "ping"})
                    continue
                if isinstance(ev, Usage):
                    if kind is not None:
                        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": block})
                    finish = end or ChoiceEnd(0, "stop")
                    yield sse_event("message_delta", {
                        "type": "message_delta",
                        "delta": {"stop_reason": _stop_reason(finish.finish_reason, finish.stop_string),
                                  "stop_sequence": finish.stop_string},
                        "usage": _usage(ev)})
                    yield sse_event("message_stop", {"type": "message_stop"})
                    return
                if isinstance(ev, ChoiceEnd):
                    end = ev
                    continue
                want, start = _block_for(ev)
                if want != kind:
                    if kind is not None:
                        yield sse_event("content_block_stop", {"type": "content_block_stop", "index": block})
                    block += 1
                    kind = want
                    yield sse_event("content_block_start", {"type": "content_block_start", "index": block,
                                                            "content_block": start})
                delta = _delta(ev)
                if delta is not None:
                    yield sse_event("content_block_delta", {"type": "content_block_delta", "index": block,
                                                            "delta": delta})
        except Exception as exc:
            yield sse_event("error", anthropic_error_body(as_inhouse_error(exc)))

    @guarded(Guard("messages.count_tokens", "infer", model="model", texts=TEXTS))
    async def count_tokens(self, request: Request) -> Response:
        body = await parse_json_model(request, CountTokensBody, self.limit)
        req = ChatRequest(model=body.model,
                          messages=normalize_messages(to_openai_messages(body.system, body.messages), body.model),
                          tools=_tools(body.tools), template_kwargs=_template_kwargs(body.thinking))
        n = await self.service.count_tokens(req)
        return json_response({"input_tokens": n})


def _block_for(ev: Event) -> tuple[str, dict[str, Any]]:
    if isinstance(ev, ReasoningDelta):
        return "thinking", {"type": "thinking", "thinking": "", "signature": ""}
    if isinstance(ev, ToolCallStart):
        return f"tool:{ev.call}", {"type": "tool_use", "id": ev.id, "name": ev.name, "input": {}}
    if isinstance(ev, ToolCallArgs):
        return f"tool:{ev.call}", {}
    return "text", {"type": "text", "text": ""}


def _delta(ev: Event) -> dict[str, Any] | None:
    if isinstance(ev, TextDelta):
        return {"type": "text_delta", "text": ev.text}
    if isinstance(ev, ReasoningDelta):
        return {"type": "thinking_delta", "thinking": ev.text}
    if isinstance(ev, ToolCallArgs):
        return {"type": "input_json_delta", "partial_json": ev.fragment}
    return None


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [ev async for ev in events]


def build_router(service: LLMService, max_request_bytes: int) -> APIRouter:
    routes = AnthropicRoutes(service, max_request_bytes)
    router = APIRouter(prefix="/v1", tags=["Anthropic"])
    router.add_api_route("/messages", routes.messages, methods=["POST"])
    router.add_api_route("/messages/count_tokens", routes.count_tokens, methods=["POST"])
    return router

