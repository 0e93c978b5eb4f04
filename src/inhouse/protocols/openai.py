"""The OpenAI-compatible API (https://platform.openai.com/docs/api-reference): models, chat
completions, completions and embeddings, JSON and server-sent events. Routes translate the
wire format to the LLM service's requests and its events back; nothing else."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, cast

import numpy as np
from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from inhouse.errors import InvalidRequestError, ModelNotFoundError, ServerNotReadyError
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
from inhouse.llm.requests import ChatRequest, CompletionRequest, JsonFormat
from inhouse.llm.service import LLMService
from inhouse.llm.types import SamplingParams, TokenLogprob
from inhouse.protocols.cache_scope import headers_tenant
from inhouse.protocols.errors import as_inhouse_error, openai_error_body
from inhouse.protocols.llm_http import (
    LenientModel,
    first_and_rest,
    json_response,
    parse_json_model,
    sse_data,
    sse_response,
    until_disconnected,
)
from inhouse.security.pii import PieceTexts
from inhouse.security.pipeline import Guard, TextFn, Texts, guarded, map_all_texts
from inhouse.security.policy import tool_names


class StreamOptions(LenientModel):
    include_usage: bool | None = None


class ResponseFormat(LenientModel):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, Any] | None = None


class ChatCompletionBody(LenientModel):
    """https://platform.openai.com/docs/api-reference/chat/create, in the reference's order."""

    messages: list[Any]
    model: str
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    function_call: Any = None
    functions: list[dict[str, Any]] | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool = False
    max_completion_tokens: int | None = Field(default=None, ge=1)
    max_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=64)
    parallel_tool_calls: bool = True
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    reasoning_effort: str | None = None
    response_format: ResponseFormat | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    tool_choice: Any = None
    tools: list[Any] | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None
    # ---- inhouse / vLLM extensions ----
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    chat_template_kwargs: dict[str, Any] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    priority: int = 0


class CompletionBody(LenientModel):
    """https://platform.openai.com/docs/api-reference/completions/create"""

    model: str
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    max_tokens: int | None = Field(default=16, ge=1)
    n: int = Field(default=1, ge=1, le=64)
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    user: str | None = None
    top_k: int | None = Field(default=None, ge=-1)
    repetition_penalty: float | None = Field(default=None, gt=0)
    response_format: ResponseFormat | None = None
    ignore_eos: bool = False
    priority: int = 0


class EmbeddingBody(LenientModel):
    """https://platform.openai.com/docs/api-reference/embeddings/create"""

    input: str | list[str] | list[int] | list[list[int]]
    model: str
    dimensions: int | None = Field(default=None, ge=1)
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None


# ---- request translation ----------------------------------------------------------------------
def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    return [s for s in stops if s]


def _sampling(body: ChatCompletionBody | CompletionBody, max_tokens: int | None,
              logprobs: int | None) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=1.0 if body.top_p is None else body.top_p,
        top_k=max(body.top_k or 0, 0),
        seed=body.seed,
        stop=_stops(body.stop),
        stop_token_ids=list(getattr(body, "stop_token_ids", None) or []),
        ignore_eos=body.ignore_eos,
        frequency_penalty=body.frequency_penalty,
        presence_penalty=body.presence_penalty,
        repetition_penalty=body.repetition_penalty or 1.0,
        logprobs=logprobs,
    )


def _response_format(rf: ResponseFormat | None) -> JsonFormat | None:
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return JsonFormat(None)
    js = rf.json_schema or {}
    schema = js.get("schema")
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format json_schema needs {\"json_schema\": {\"name\": ..., "
                                  "\"schema\": {...}}}.", details={"param": "response_format.json_schema.schema"})
    return JsonFormat(schema)


_NAMED_CHOICE = '{"type": "function", "function": {"name": ...}}.'


def _tool_choice(choice: Any) -> str:
    if choice is None:
        return "auto"
    if isinstance(choice, str):
        if choice in ("auto", "none", "required"):
            return choice
        raise InvalidRequestError(f"tool_choice '{choice}' is not 'auto', 'none', 'required' or "
                                  + _NAMED_CHOICE, details={"param": "tool_choice"})
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else choice.get("name")
        if isinstance(name, str) and name:
            return name
    raise InvalidRequestError("tool_choice must be 'auto', 'none', 'required' or " + _NAMED_CHOICE,
                              details={"param": "tool_choice"})


def chat_request(body: ChatCompletionBody) -> ChatRequest:
    tools_raw = body.tools
    choice: Any = body.tool_choice
    if tools_raw is None and body.functions:  # the legacy form
        tools_raw = [{"type": "function", "function": f} for f in body.functions]
        fc = body.function_call
        choice = {"function": fc} if isinstance(fc, dict) else fc
    tools = normalize_tools(tools_raw)
    tool_choice = _tool_choice(choice)
    if tool_choice not in ("auto", "none") and not tools:
        raise InvalidRequestError("tool_choice needs 'tools' to choose from.", details={"param": "tool_choice"})
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    kwargs = dict(body.chat_template_kwargs or {})
    return ChatRequest(
        model=body.model,
        messages=normalize_messages(body.messages, body.model),
        sampling=_sampling(body, max_tokens, logprobs),
        tools=tools,
        tool_choice=tool_choice,
        parallel_tool_calls=body.parallel_tool_calls,
        response_format=_response_format(body.response_format),
        n=body.n,
        template_kwargs=kwargs,
        priority=body.priority,
    )


def completion_request(body: CompletionBody) -> CompletionRequest:
    p = body.prompt
    prompts: list[str | list[int]]
    if isinstance(p, str):
        prompts = [p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]  # type: ignore[arg-type]
    else:
        prompts = list(p)  # type: ignore[arg-type]
    if not prompts:
        raise InvalidRequestError("'prompt' is empty.", details={"param": "prompt"})
    if body.suffix:
        raise InvalidRequestError("'suffix' (fill-in-the-middle) is not supported by this server.",
                                  details={"param": "suffix"})
    return CompletionRequest(
        model=body.model, prompts=prompts, sampling=_sampling(body, body.max_tokens, body.logprobs),
        n=body.n, echo=body.echo, response_format=_response_format(body.response_format), priority=body.priority,
    )


# ---- rendering ------------------------------------------------------------------------------------
def _usage(u: Usage) -> dict[str, Any]:
    return {"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens,
            "total_tokens": u.total_tokens, "prompt_tokens_details": {"cached_tokens": u.cached_tokens}}


def _chat_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    return {"content": [{
        "token": lp.token, "logprob": lp.logprob, "bytes": list(lp.token.encode()),
        "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for _, t, v in lp.top],
    } for lp in lps], "refusal": None}


def _completion_logprobs(lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    if lps is None:
        return None
    offsets, pos = [], 0
    for lp in lps:
        offsets.append(pos)
        pos += len(lp.token)
    return {"tokens": [lp.token for lp in lps], "token_logprobs": [lp.logprob for lp in lps],
            "top_logprobs": [{t: v for _, t, v in lp.top} for lp in lps], "text_offset": offsets}


def _want_usage(opts: StreamOptions | None, default: bool) -> bool:
    if opts is None or opts.include_usage is None:
        return default
    return opts.include_usage


# ---- what the security layer reads: the texts of requests and of streamed chunks ------------
def map_content(value: Any, fn: TextFn) -> Any:
    """A message 'content' / 'system' / 'prompt' / 'input': a string, or a list of strings or
    parts with 'text' (and nested 'content', as in tool results)."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        out = []
        for item in value:
            if isinstance(item, dict):
                if isinstance(item.get("text"), str):
                    item["text"] = fn(item["text"])
                if "content" in item:
                    item["content"] = map_content(item["content"], fn)
                out.append(item)
            else:
                out.append(map_content(item, fn))
        return out
    return value


def map_request_texts(doc: Any, fn: TextFn) -> None:
    """The texts of a chat, completion or embedding request (also Anthropic's messages)."""
    if not isinstance(doc, dict):
        return
    for key in ("system", "prompt", "input", "instructions"):
        if key in doc:
            doc[key] = map_content(doc[key], fn)
    messages = doc.get("messages")
    if isinstance(messages, list):
        for msg in messages:
            if isinstance(msg, dict) and "content" in msg:
                msg["content"] = map_content(msg["content"], fn)


def request_tools(doc: Any) -> list[str] | None:
    return tool_names(doc.get("tools")) if isinstance(doc, dict) else None


def stream_texts(doc: Any, pieces: PieceTexts) -> list[Any]:
    """One chat or completion chunk: each choice's text goes through ``pieces`` (a placeholder
    split between chunks of a choice is joined first), then every other text."""
    if not isinstance(doc, dict):
        return [doc]
    choices = doc.get("choices")
    if isinstance(choices, list):
        for c in choices:
            if not isinstance(c, dict):
                continue
            key, final = f"c{c.get('index', 0)}", c.get("finish_reason") is not None
            delta = c.get("delta")
            if isinstance(delta, dict) and (isinstance(delta.get("content"), str) or (final and key in pieces.held)):
                delta["content"] = pieces.piece(key, delta.get("content") or "", final)
            elif isinstance(c.get("text"), str):
                c["text"] = pieces.piece(key, c["text"], final)
    return [map_all_texts(doc, pieces.fn)]


TEXTS = Texts(request=map_request_texts, tools=request_tools, stream=stream_texts)
_MODELS = Guard("models.list", "infer")


class OpenAIRoutes:
    def __init__(self, service: LLMService, max_request_bytes: int, stream_usage_default: bool,
                 ready: Callable[[], bool] | None = None) -> None:
        self.service = service
        self.limit = max_request_bytes
        self.stream_usage_default = stream_usage_default
        self.ready = ready or (lambda: True)

    # ---- chat ----------------------------------------------------------------------------------
    @guarded(Guard("chat.completions", "infer", model="model", texts=TEXTS))
    async def chat(self, request: Request) -> Response:
        body = await parse_json_model(request, ChatCompletionBody, self.limit)
        self.service.require_model(body.model)  # an unknown model says so before its messages are judged
        req = chat_request(body)
        req.cache_tenant = headers_tenant(request.headers)
        rid, created = f"chatcmpl-{req.request_id}", int(time.time())
        events = self.service.chat(req)
        if body.stream:
            _, stream = await first_and_rest(events, request)
            usage = _want_usage(body.stream_options, self.stream_usage_default)
            return sse_response(self._chat_stream(stream, rid, created, body.model, req.n, usage))
        collected = await until_disconnected(request, _collect(events))
        done = aggregate(collected, req.n)
        choices = []
        for c in done.choices:
            message: dict[str, Any] = {"role": "assistant",
                                       "content": c.text if (c.text or not c.tool_calls) else None}
            if c.reasoning:
                message["reasoning_content"] = c.reasoning
            if c.tool_calls:
                message["tool_calls"] = [{"id": t.id, "type": "function",
                                          "function": {"name": t.name, "arguments": t.arguments}}
                                         for t in c.tool_calls]
            choices.append({"index": c.index, "message": message, "logprobs": _chat_logprobs(c.logprobs),
                            "finish_reason": c.finish_reason})
        return json_response({"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                              "system_fingerprint": None, "choices": choices, "usage": _usage(done.usage)})

    async def _chat_stream(self, events: AsyncIterator[Event], rid: str, created: int, model: str, n: int,
                           include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(index: int, delta: dict[str, Any], finish: str | None = None,
                  logprobs: dict[str, Any] | None = None) -> bytes:
            return sse_data({"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                             "system_fingerprint": None,
                             "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                                          "finish_reason": finish}]})

        try:
            async for ev in events:
                if isinstance(ev, TextDelta):  # first: nearly every event is one
                    yield chunk(ev.choice, {"content": ev.text}, logprobs=_chat_logprobs(ev.logprobs))
                    continue
                if isinstance(ev, Usage):
                    if include_usage:
                        yield sse_data({"id": rid, "object": "chat.completion.chunk", "created": created,
                                        "model": model, "system_fingerprint": None, "choices": [],
                                        "usage": _usage(ev)})
                    continue
                if isinstance(ev, Prompt):
                    for i in range(ev.n):
                        yield chunk(i, {"role": "assistant", "content": ""})
                    continue
                if isinstance(ev, ReasoningDelta):
                    yield chunk(ev.choice, {"reasoning_content": ev.text})
                elif isinstance(ev, ToolCallStart):
                    yield chunk(ev.choice, {"tool_calls": [{"index": ev.call, "id": ev.id, "type": "function",
                                                            "function": {"name": ev.name, "arguments": ""}}]})
                elif isinstance(ev, ToolCallArgs):
                    yield chunk(ev.choice, {"tool_calls": [{"index": ev.call, "function": {"arguments": ev.fragment}}]})
                elif isinstance(ev, ChoiceEnd):
                    yield chunk(ev.choice, {}, ev.finish_reason)
        except Exception as exc:  # after the headers: report in-band, as OpenAI does
            yield sse_data(openai_error_body(as_inhouse_error(exc)))
        yield b"data: [DONE]\n\n"

    # ---- completions ---------------------------------------------------------------------------
    @guarded(Guard("completions", "infer", model="model", texts=TEXTS))
    async def completions(self, request: Request) -> Response:
        body = await parse_json_model(request, CompletionBody, self.limit)
        req = completion_request(body)
        req.cache_tenant = headers_tenant(request.headers)
        rid, created = f"cmpl-{req.request_id}", int(time.time())
        events = self.service.complete(req)
        if body.stream:
            _, stream = await first_and_rest(events, request)
            usage = _want_usage(body.stream_options, self.stream_usage_default)
            return sse_response(self._completion_stream(stream, rid, created, body.model, usage))
        collected = await until_disconnected(request, _collect(events))
        done = aggregate(collected, len(req.prompts) * req.n)
        choices = [{"index": c.index, "text": c.text, "logprobs": _completion_logprobs(c.logprobs),
                    "finish_reason": c.finish_reason} for c in done.choices]
        return json_response({"id": rid, "object": "text_completion", "created": created, "model": body.model,
                              "system_fingerprint": None, "choices": choices, "usage": _usage(done.usage)})

    async def _completion_stream(self, events: AsyncIterator[Event], rid: str, created: int, model: str,
                                 include_usage: bool) -> AsyncIterator[bytes]:
        def chunk(index: int, text: str, finish: str | None = None, logprobs: Any = None) -> bytes:
            return sse_data({"id": rid, "object": "text_completion", "created": created, "model": model,
                             "system_fingerprint": None,
                             "choices": [{"index": index, "text": text, "logprobs": logprobs,
                                          "finish_reason": finish}]})

        try:
            async for ev in events:
                if isinstance(ev, Usage):
                    if include_usage:
                        yield sse_data({"id": rid, "object": "text_completion", "created": created, "model": model,
                                        "choices": [], "usage": _usage(ev)})
                elif isinstance(ev, TextDelta):
                    yield chunk(ev.choice, ev.text, logprobs=_completion_logprobs(ev.logprobs))
                elif isinstance(ev, ChoiceEnd):
                    yield chunk(ev.choice, "", ev.finish_reason)
        except Exception as exc:
            yield sse_data(openai_error_body(as_inhouse_error(exc)))
        yield b"data: [DONE]\n\n"

    # ---- embeddings ----------------------------------------------------------------------------
    @guarded(Guard("embeddings", "infer", model="model", texts=TEXTS))
    async def embeddings(self, request: Request) -> Response:
        body = await parse_json_model(request, EmbeddingBody, self.limit)
        inputs: list[str] | list[list[int]]
        if isinstance(body.input, str):
            inputs = [body.input]
        elif body.input and all(isinstance(x, int) for x in body.input):
            inputs = [[int(x) for x in body.input]]  # type: ignore[arg-type]  # checked: all ints
        else:
            inputs = cast(list[str] | list[list[int]], list(body.input))
        vectors, tokens, _ = await until_disconnected(request, self.service.embed(body.model, inputs))
        if body.dimensions is not None:
            if body.dimensions > vectors.shape[1]:
                raise InvalidRequestError(
                    f"dimensions {body.dimensions} is larger than the model's {vectors.shape[1]}.",
                    details={"param": "dimensions"})
            vectors = vectors[:, : body.dimensions]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms == 0, 1, norms)
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        data = []
        for i, v in enumerate(vectors):
            emb: Any = base64.b64encode(v.tobytes()).decode() if body.encoding_format == "base64" else v.tolist()
            data.append({"object": "embedding", "embedding": emb, "index": i})
        return json_response({"object": "list", "data": data, "model": body.model,
                              "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    # ---- models --------------------------------------------------------------------------------
    def _model_doc(self, m: Any) -> dict[str, Any]:
        doc = {"id": m.id, "object": "model", "created": m.created, "owned_by": "inhouse", "root": m.model}
        if m.max_model_len is not None:
            doc["max_model_len"] = m.max_model_len
        return doc

    @guarded(_MODELS)
    async def models(self, request: Request) -> Response:
        # clients poll this as a health check: an empty list while loading would tell them to go ahead
        if not self.ready():
            raise ServerNotReadyError("The server is still loading its models; retry shortly.",
                                      headers={"Retry-After": "1"})
        return json_response({"object": "list", "data": [self._model_doc(m) for m in self.service.served_models()]})

    @guarded(_MODELS)
    async def model(self, request: Request) -> Response:
        wanted = request.path_params["model"]
        for m in self.service.served_models():
            if m.id == wanted:
                return json_response(self._model_doc(m))
        names = ", ".join(m.id for m in self.service.served_models()) or "none"
        raise ModelNotFoundError(
            f"The model '{wanted}' does not exist on this server. Served models: {names}.",
            details={"param": "model"})


async def _collect(events: AsyncIterator[Event]) -> list[Event]:
    return [ev async for ev in events]


def build_router(service: LLMService, max_request_bytes: int, stream_usage_default: bool,
                 ready: Callable[[], bool] | None = None) -> APIRouter:
    """``ready``: whether start-up loading has finished (``/v1/models`` answers 503 until then)."""
    routes = OpenAIRoutes(service, max_request_bytes, stream_usage_default, ready)
    router = APIRouter(prefix="/v1", tags=["OpenAI"])
    router.add_api_route("/models", routes.models, methods=["GET"])
    router.add_api_route("/models/{model:path}", routes.model, methods=["GET"])
    router.add_api_route("/chat/completions", routes.chat, methods=["POST"])
    router.add_api_route("/completions", routes.completions, methods=["POST"])
    router.add_api_route("/embeddings", routes.embeddings, methods=["POST"])
    return router


def new_request_id() -> str:
    return uuid.uuid4().hex
