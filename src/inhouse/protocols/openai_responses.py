"""The OpenAI Responses API (https://platform.openai.com/docs/api-reference/responses):
``POST /v1/responses`` (JSON and streamed events), ``GET`` / ``DELETE /v1/responses/{id}``.
Input items become the same chat requests the chat-completions adapter makes; the LLM
service's events become output items. Stored responses are kept in memory, per API key."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson
from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import InhouseError, InvalidRequestError, ResponseNotFoundError
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
from inhouse.protocols.errors import as_inhouse_error
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
from inhouse.security.pipeline import Guard, TextFn, Texts, credential, guarded


class TextFormat(LenientModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(LenientModel):
    format: TextFormat | None = None
    verbosity: str | None = None


class ReasoningConfig(LenientModel):
    effort: str | None = None
    summary: str | None = None


class ResponsesBody(LenientModel):
    """https://platform.openai.com/docs/api-reference/responses/create, in the reference's order."""

    background: bool | None = None
    include: list[str] | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    metadata: dict[str, Any] | None = None
    model: str
    parallel_tool_calls: bool = True
    previous_response_id: str | None = None
    reasoning: ReasoningConfig | None = None
    store: bool = True
    stream: bool = False
    temperature: float | None = Field(default=None, ge=0, le=2)
    text: TextConfig | None = None
    tool_choice: Any = None
    tools: list[Any] | None = None
    top_p: float | None = Field(default=None, gt=0, le=1)
    truncation: str | None = None
    user: str | None = None
    # ---- inhouse / vLLM extensions ----
    top_k: int | None = Field(default=None, ge=-1)
    seed: int | None = None
    ignore_eos: bool = False
    priority: int = 0


# ---- stored responses -----------------------------------------------------------------------------
@dataclass(slots=True)
class Stored:
    owner: str
    doc: dict[str, Any]  # the response object as answered
    conversation: list[dict[str, Any]]  # chat-form messages: earlier turns, this input, this output
    size: int = 0


class ResponseStore:
    """Responses kept for ``previous_response_id`` and retrieval, per owner (a digest of the API
    key presented), oldest dropped first beyond ``max_count`` responses or ``max_bytes``."""

    def __init__(self, max_count: int = 1000, max_bytes: int = 64 << 20) -> None:
        self.max_count = max_count
        self.max_bytes = max_bytes
        self._items: OrderedDict[str, Stored] = OrderedDict()
        self._bytes = 0

    def put(self, rid: str, item: Stored) -> None:
        item.size = len(orjson.dumps(item.doc)) + len(orjson.dumps(item.conversation))
        self._items[rid] = item
        self._bytes += item.size
        while self._items and (len(self._items) > self.max_count or self._bytes > self.max_bytes):
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.size

    def get(self, rid: str, owner: str, param: str | None = None) -> Stored:
        """The stored response; another owner's id reads as unknown, never as forbidden."""
        item = self._items.get(rid)
        if item is None or item.owner != owner:
            raise ResponseNotFoundError(
                f"Response with id '{rid}' not found. It was made with another API key, stored with "
                "store: false, deleted, or dropped to keep the server's store bounded.",
                details={"param": param})
        return item

    def delete(self, rid: str, owner: str) -> None:
        item = self.get(rid, owner)
        del self._items[rid]
        self._bytes -= item.size

    def __len__(self) -> int:
        return len(self._items)


def owner_of(request: Request) -> str:
    """Who a stored response belongs to: the key presented. With authentication on the security
    layer has verified it; without, each distinct key string still sees only its own."""
    presented = credential(request.headers.get("authorization"), request.headers.get("x-api-key")) or ""
    return hashlib.sha256(presented.encode()).hexdigest()


# ---- request translation ----------------------------------------------------------------------
def _bad(msg: str, param: str) -> InvalidRequestError:
    return InvalidRequestError(msg, details={"param": param})


_PART_TYPES = {"input_image": "input_image", "input_file": "file", "input_audio": "input_audio"}


def _parts(content: Any, where: str) -> Any:
    """A message's content in chat form: a string, or parts (text kept, media left for
    ``normalize_messages`` to refuse with its text-only message)."""
    if isinstance(content, str) or content is None:
        return content
    if not isinstance(content, list):
        raise _bad(f"{where}.content must be a string or an array of input_text parts.", f"{where}.content")
    out: list[Any] = []
    for j, part in enumerate(content):
        if isinstance(part, dict) and part.get("type") in _PART_TYPES:
            out.append({"type": _PART_TYPES[part["type"]]})
        elif isinstance(part, dict) and part.get("type") == "refusal":
            out.append({"type": "text", "text": str(part.get("refusal", ""))})
        elif isinstance(part, dict) and part.get("type") not in (None, "input_text", "output_text", "text"):
            raise _bad(f"{where}.content[{j}] has unknown part type '{part.get('type')}'; use 'input_text'.",
                       f"{where}.content[{j}].type")
        else:
            out.append(part)
    return out


def _reasoning_text(item: dict[str, Any]) -> str:
    texts = [p.get("text", "") for p in item.get("content") or [] if isinstance(p, dict)]
    if not any(texts):
        texts = [p.get("text", "") for p in item.get("summary") or [] if isinstance(p, dict)]
    return "".join(t for t in texts if isinstance(t, str))


def input_messages(value: Any, known_calls: set[str]) -> list[dict[str, Any]]:
    """``input`` (a string or input items) → chat-form messages. ``known_calls``: the call ids
    of earlier turns; each ``function_call_output`` must answer one of those or of this input."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise _bad("'input' must be a string or an array of input items.", "input")
    out: list[dict[str, Any]] = []
    calls = set(known_calls)
    reasoning = ""
    prev_kind = ""
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise _bad(f"{where} must be an object such as {{\"role\": \"user\", \"content\": \"...\"}}.", where)
        kind = item.get("type", "message" if "role" in item else None)
        previous, prev_kind = prev_kind, f"{kind}:{item.get('role')}" if kind == "message" else str(kind)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise _bad(f"{where}.role must be 'user', 'assistant', 'system' or 'developer'.", f"{where}.role")
            msg: dict[str, Any] = {"role": role, "content": _parts(item.get("content"), where)}
            if role == "assistant" and reasoning:
                msg["reasoning_content"], reasoning = reasoning, ""
            out.append(msg)
        elif kind == "function_call":
            call_id, name = item.get("call_id"), item.get("name")
            if not isinstance(call_id, str) or not call_id or not isinstance(name, str) or not name:
                raise _bad(f"{where} (function_call) needs a 'call_id' and a 'name'.", where)
            calls.add(call_id)
            call = {"id": call_id, "type": "function",
                    "function": {"name": name, "arguments": item.get("arguments") or "{}"}}
            if out and out[-1]["role"] == "assistant" and previous in ("message:assistant", "function_call"):
                out[-1].setdefault("tool_calls", []).append(call)  # one assistant turn: its text and calls
            else:
                msg = {"role": "assistant", "content": None, "tool_calls": [call]}
                if reasoning:
                    msg["reasoning_content"], reasoning = reasoning, ""
                out.append(msg)
        elif kind == "function_call_output":
            call_id = item.get("call_id")
            if not isinstance(call_id, str) or call_id not in calls:
                raise _bad(f"{where}.call_id '{call_id}' matches no function_call in this input or the previous "
                           "response; send the function_call item (or previous_response_id) with its output.",
                           f"{where}.call_id")
            output = item.get("output")
            if not isinstance(output, str | list):
                raise _bad(f"{where}.output must be a string or an array of input_text parts.", f"{where}.output")
            out.append({"role": "tool", "tool_call_id": call_id, "content": _parts(output, where)})
        elif kind == "reasoning":
            reasoning += _reasoning_text(item)
        else:
            raise _bad(f"{where}.type '{kind}' is not supported; use 'message', 'function_call', "
                       "'function_call_output' or 'reasoning'.", f"{where}.type")
    return out


def _call_ids(messages: list[dict[str, Any]]) -> set[str]:
    return {c["id"] for m in messages for c in m.get("tool_calls") or [] if isinstance(c.get("id"), str)}


def convert_tools(tools: list[Any] | None) -> list[dict[str, Any]] | None:
    """Responses function tools (flat: ``{"type": "function", "name", "parameters"}``) → chat form."""
    if tools is None:
        return None
    converted = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type") != "function":
            kind = t.get("type") if isinstance(t, dict) else None
            raise _bad(f"tools[{i}] is a '{kind}' tool; this server runs function tools only "
                       "({\"type\": \"function\", \"name\": ..., \"parameters\": {...}}).", f"tools[{i}]")
        fn = t["function"] if isinstance(t.get("function"), dict) else {
            k: t[k] for k in ("name", "description", "parameters") if k in t}
        converted.append({"type": "function", "function": fn})
    return normalize_tools(converted)


def _tool_choice(choice: Any) -> str:
    if choice is None:
        return "auto"
    if choice in ("auto", "none", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return str(choice["name"])
    raise _bad("tool_choice must be 'auto', 'none', 'required' or {\"type\": \"function\", \"name\": ...}.",
               "tool_choice")


def _text_format(text: TextConfig | None) -> JsonFormat | None:
    fmt = text.format if text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return JsonFormat(None)
    if not isinstance(fmt.schema_, dict):
        raise _bad('text.format json_schema needs {"type": "json_schema", "name": ..., "schema": {...}}.',
                   "text.format.schema")
    return JsonFormat(fmt.schema_)


def _template_kwargs(reasoning: ReasoningConfig | None) -> dict[str, Any]:
    # the one switch chat templates share; effort levels beyond on/off have no template meaning
    if reasoning is None or reasoning.effort is None:
        return {}
    return {"enable_thinking": reasoning.effort != "none"}


def responses_request(body: ResponsesBody, earlier: list[dict[str, Any]]) -> tuple[ChatRequest, list[dict[str, Any]]]:
    """The chat request, and this turn's messages (earlier turns plus this input, without the
    instructions, which a following response does not inherit)."""
    if body.background:
        raise _bad("background responses are not supported by this server; leave 'background' unset.",
                   "background")
    if body.input is None and not earlier:
        raise _bad("'input' is required (a string or an array of input items).", "input")
    turn = earlier + (input_messages(body.input, _call_ids(earlier)) if body.input is not None else [])
    if not turn:
        raise _bad("'input' is empty; send a string or at least one input item.", "input")
    tools = convert_tools(body.tools)
    choice = _tool_choice(body.tool_choice)
    if choice not in ("auto", "none") and not tools:
        raise _bad("tool_choice needs 'tools' to choose from.", "tool_choice")
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    req = ChatRequest(
        model=body.model,
        messages=normalize_messages(system + turn, body.model),
        sampling=SamplingParams(
            max_tokens=body.max_output_tokens, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=max(body.top_k or 0, 0), seed=body.seed,
            ignore_eos=body.ignore_eos),
        tools=tools, tool_choice=choice, parallel_tool_calls=body.parallel_tool_calls,
        response_format=_text_format(body.text), template_kwargs=_template_kwargs(body.reasoning),
        priority=body.priority,
    )
    return req, turn


# ---- rendering ------------------------------------------------------------------------------------
def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _usage(u: Usage) -> dict[str, Any]:
    # reasoning tokens are not counted apart from the rest of the output
    return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": u.cached_tokens},
            "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": u.total_tokens}


def _message_item(mid: str, text: str, status: str) -> dict[str, Any]:
    return {"id": mid, "type": "message", "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _reasoning_item(rid: str, text: str) -> dict[str, Any]:
    return {"id": rid, "type": "reasoning", "summary": [], "content": [{"type": "reasoning_text", "text": text}]}


def _call_item(fid: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"id": fid, "type": "function_call", "status": status, "call_id": call_id, "name": name,
            "arguments": arguments}


def _assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """This turn's output as the chat-form assistant message a following turn sends back."""
    text = "".join(p["text"] for it in output if it["type"] == "message" for p in it["content"])
    reasoning = "".join(p["text"] for it in output if it["type"] == "reasoning" for p in it["content"])
    msg: dict[str, Any] = {"role": "assistant", "content": text or None}
    if reasoning:
        msg["reasoning_content"] = reasoning
    calls = [{"id": it["call_id"], "type": "function", "function": {"name": it["name"], "arguments": it["arguments"]}}
             for it in output if it["type"] == "function_call"]
    if calls:
        msg["tool_calls"] = calls
    return msg


@dataclass(slots=True)
class _Turn:
    """One response being made: what its documents repeat of the request."""

    rid: str
    created: int
    body: ResponsesBody
    output: list[dict[str, Any]] = field(default_factory=list)

    def doc(self, status: str, usage: Usage | None = None, error: dict[str, Any] | None = None) -> dict[str, Any]:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text and b.text.format else {
            "type": "text"}
        return {
            "id": self.rid, "object": "response", "created_at": self.created, "status": status, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": b.model,
            "output": self.output, "parallel_tool_calls": b.parallel_tool_calls,
            "previous_response_id": b.previous_response_id,
            "reasoning": {"effort": b.reasoning.effort if b.reasoning else None,
                          "summary": b.reasoning.summary if b.reasoning else None},
            "store": b.store, "temperature": 1.0 if b.temperature is None else b.temperature,
            "text": {"format": fmt}, "tool_choice": b.tool_choice if b.tool_choice is not None else "auto",
            "tools": b.tools or [], "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled",
            "usage": _usage(usage) if usage is not None else None, "user": b.user, "metadata": b.metadata or {},
        }


def _status(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def _error_doc(err: InhouseError) -> dict[str, Any]:
    return {"code": str(err.code), "message": err.message}


# ---- what the security layer reads: request texts and streamed events ------------------------
_ID_KEYS = frozenset({"id", "call_id", "item_id", "previous_response_id", "type", "status", "object", "model",
                      "role", "name", "truncation", "tool_choice", "effort", "summary", "reason", "code"})


def _map_texts(value: Any, fn: TextFn) -> Any:
    """Every text of an answer document except identifiers and enum-like fields (ids of stored
    responses must come back as they were made)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [_map_texts(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: v if k in _ID_KEYS else _map_texts(v, fn) for k, v in value.items()}
    return value


def map_request_texts(doc: Any, fn: TextFn) -> None:
    """``instructions``, and the texts of ``input``: message contents and function outputs."""
    if not isinstance(doc, dict):
        return
    if isinstance(doc.get("instructions"), str):
        doc["instructions"] = fn(doc["instructions"])
    items = doc.get("input")
    if isinstance(items, str):
        doc["input"] = fn(items)
    elif isinstance(items, list):
        for item in items:
            if not isinstance(item, dict):
                continue
            for key in ("content", "output"):
                if key in item:
                    item[key] = openai.map_content(item[key], fn)


def stream_texts(doc: Any, pieces: PieceTexts) -> list[Any]:
    """One streamed event: text deltas go through ``pieces`` per content part (a placeholder
    split between deltas is joined first); text held back at the end of a part is flushed in an
    extra delta before its ``output_text.done``, numbered like that event."""
    if not isinstance(doc, dict):
        return [doc]
    kind = doc.get("type")
    key = ("r", doc.get("output_index"), doc.get("content_index"))
    if kind == "response.output_text.delta" and isinstance(doc.get("delta"), str):
        doc["delta"] = pieces.piece(key, doc["delta"], False)
        return [doc]
    if kind == "response.output_text.done" and key in pieces.held:
        flush: dict[str, Any] = {
            "type": "response.output_text.delta", "sequence_number": doc.get("sequence_number"),
            "item_id": doc.get("item_id"), "output_index": doc.get("output_index"),
            "content_index": doc.get("content_index"), "delta": pieces.piece(key, "", True), "logprobs": []}
        return [flush, _map_texts(doc, pieces.fn)]
    return [_map_texts(doc, pieces.fn)]


TEXTS = Texts(request=map_request_texts, tools=openai.request_tools, stream=stream_texts)


class _Stream:
    """The event sequence of one streamed response, numbered."""

    def __init__(self, turn: _Turn) -> None:
        self.turn = turn
        self.seq = 0
        self.open: dict[str, Any] | None = None  # the output item being streamed
        self.parts: list[str] = []  # its text (message, reasoning) or arguments so far

    def event(self, kind: str, **fields: Any) -> bytes:
        doc = {"type": kind, "sequence_number": self.seq, **fields}
        self.seq += 1
        return sse_event(kind, doc)

    def start(self, item: dict[str, Any]) -> list[bytes]:
        self.open, self.parts = item, []
        index = len(self.turn.output)
        out = [self.event("response.output_item.added", output_index=index, item=item)]
        part = {"message": {"type": "output_text", "text": "", "annotations": [], "logprobs": []},
                "reasoning": {"type": "reasoning_text", "text": ""}}.get(item["type"])
        if part is not None:
            out.append(self.event("response.content_part.added", item_id=item["id"], output_index=index,
                                  content_index=0, part=part))
        return out

    def delta(self, text: str) -> bytes:
        if self.open is None:  # arguments without their call's start: nothing to attach them to
            return b""
        self.parts.append(text)
        index, iid = len(self.turn.output), self.open["id"]
        if self.open["type"] == "message":
            return self.event("response.output_text.delta", item_id=iid, output_index=index, content_index=0,
                              delta=text, logprobs=[])
        if self.open["type"] == "reasoning":
            return self.event("response.reasoning_text.delta", item_id=iid, output_index=index, content_index=0,
                              delta=text)
        return self.event("response.function_call_arguments.delta", item_id=iid, output_index=index, delta=text)

    def finish(self, status: str) -> list[bytes]:
        item = self.open
        if item is None:
            return []
        self.open = None
        index, iid, text = len(self.turn.output), item["id"], "".join(self.parts)
        out: list[bytes] = []
        if item["type"] == "message":
            done = _message_item(iid, text, status)
            part = done["content"][0]
            out.append(self.event("response.output_text.done", item_id=iid, output_index=index, content_index=0,
                                  text=text, logprobs=[]))
            out.append(self.event("response.content_part.done", item_id=iid, output_index=index, content_index=0,
                                  part=part))
        elif item["type"] == "reasoning":
            done = _reasoning_item(iid, text)
            part = done["content"][0]
            out.append(self.event("response.reasoning_text.done", item_id=iid, output_index=index, content_index=0,
                                  text=text))
            out.append(self.event("response.content_part.done", item_id=iid, output_index=index, content_index=0,
                                  part=part))
        else:
            done = _call_item(iid, item["call_id"], item["name"], text, "completed")
            out.append(self.event("response.function_call_arguments.done", item_id=iid, output_index=index,
                                  name=item["name"], arguments=text))
        out.append(self.event("response.output_item.done", output_index=index, item=done))
        self.turn.output.append(done)
        return out


class ResponsesRoutes:
    def __init__(self, service: LLMService, max_request_bytes: int, store: ResponseStore | None = None) -> None:
        self.service = service
        self.limit = max_request_bytes
        self.store = store if store is not None else ResponseStore()

    @guarded(Guard("responses.create", "infer", model="model", texts=TEXTS))
    async def create(self, request: Request) -> Response:
        body = await parse_json_model(request, ResponsesBody, self.limit)
        owner = owner_of(request)
        self.service.require_model(body.model)  # an unknown model says so before the input is judged
        earlier: list[dict[str, Any]] = []
        if body.previous_response_id is not None:
            earlier = list(self.store.get(body.previous_response_id, owner, "previous_response_id").conversation)
        req, turn_messages = responses_request(body, earlier)
        turn = _Turn(_new_id("resp"), int(time.time()), body)
        events = self.service.chat(req)
        if body.stream:
            _, stream = await first_and_rest(events, request)
            return sse_response(self._stream(stream, turn, owner, turn_messages))
        done = aggregate(await until_disconnected(request, _collect(events)), 1)
        c = done.choices[0]
        status = _status(c.finish_reason)
        if c.reasoning:
            turn.output.append(_reasoning_item(_new_id("rs"), c.reasoning))
        if c.text or not c.tool_calls:
            turn.output.append(_message_item(_new_id("msg"), c.text, status))
        for t in c.tool_calls:
            turn.output.append(_call_item(_new_id("fc"), t.id, t.name, t.arguments, "completed"))
        doc = turn.doc(status, done.usage)
        self._keep(body, owner, doc, turn_messages)
        return json_response(doc)

    def _keep(self, body: ResponsesBody, owner: str, doc: dict[str, Any], turn: list[dict[str, Any]]) -> None:
        if body.store:
            self.store.put(doc["id"], Stored(owner, doc, [*turn, _assistant_message(doc["output"])]))

    async def _stream(self, events: AsyncIterator[Event], turn: _Turn, owner: str,
                      turn_messages: list[dict[str, Any]]) -> AsyncIterator[bytes]:
        s = _Stream(turn)
        status = "completed"
        try:
            async for ev in events:
                if isinstance(ev, Prompt):
                    yield s.event("response.created", response=turn.doc("in_progress"))
                    yield s.event("response.in_progress", response=turn.doc("in_progress"))
                elif isinstance(ev, TextDelta | ReasoningDelta):
                    kind = "message" if isinstance(ev, TextDelta) else "reasoning"
                    if s.open is None or s.open["type"] != kind:
                        for b in s.finish("completed"):
                            yield b
                        item = (_message_item(_new_id("msg"), "", "in_progress") if kind == "message"
                                else _reasoning_item(_new_id("rs"), ""))
                        item["content"] = []
                        for b in s.start(item):
                            yield b
                    yield s.delta(ev.text)
                elif isinstance(ev, ToolCallStart):
                    for b in s.finish("completed"):
                        yield b
                    for b in s.start(_call_item(_new_id("fc"), ev.id, ev.name, "", "in_progress")):
                        yield b
                elif isinstance(ev, ToolCallArgs):
                    yield s.delta(ev.fragment)
                elif isinstance(ev, ChoiceEnd):
                    status = _status(ev.finish_reason)
                    if not turn.output and s.open is None:  # nothing generated: one empty message
                        for b in s.start(_message_item(_new_id("msg"), "", "in_progress") | {"content": []}):
                            yield b
                    for b in s.finish(status):
                        yield b
                elif isinstance(ev, Usage):
                    doc = turn.doc(status, ev)
                    self._keep(turn.body, owner, doc, turn_messages)
                    yield s.event("response.completed" if status == "completed" else "response.incomplete",
                                  response=doc)
        except Exception as exc:  # after the headers: report in-band, as OpenAI does
            err = as_inhouse_error(exc)
            yield s.event("error", code=str(err.code), message=err.message, param=err.details.get("param"))
            yield s.event("response.failed", response=turn.doc("failed", error=_error_doc(err)))

    @guarded(Guard("responses.retrieve", "infer"))
    async def retrieve(self, request: Request) -> Response:
        return json_response(self.store.get(request.path_params["response_id"], owner_of(request)).doc)

    @guarded(Guard("responses.delete", "infer"))
    async def delete(self, request: Request) -> Response:
        rid = request.path_params["response_id"]
        self.store.delete(rid, owner_of(request))
        return json_response({"id": rid, "object": "response", "deleted": True})


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [ev async for ev in events]


def build_router(service: LLMService, max_request_bytes: int, store: ResponseStore | None = None) -> APIRouter:
    routes = ResponsesRoutes(service, max_request_bytes, store)
    router = APIRouter(prefix="/v1", tags=["OpenAI"])
    router.add_api_route("/responses", routes.create, methods=["POST"])
    router.add_api_route("/responses/{response_id}", routes.retrieve, methods=["GET"])
    router.add_api_route("/responses/{response_id}", routes.delete, methods=["DELETE"])
    return router
