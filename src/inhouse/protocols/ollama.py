"""Ollama's native API (https://github.com/ollama/ollama/blob/main/docs/api.md) on the same
port: ``/api/version``, ``/api/tags``, ``/api/ps``, ``/api/show``, ``/api/chat``,
``/api/generate`` (newline-delimited JSON streams by default), ``/api/embed`` and the legacy
``/api/embeddings``. Requests become the LLM service's chat, completion and embedding requests;
its events come back as Ollama's chunks. Nothing else."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter
from pydantic import Field
from starlette.requests import Request
from starlette.responses import Response

from inhouse import __version__
from inhouse.core.manager import ModelManager, ModelVersion
from inhouse.errors import ContextLengthError, InvalidRequestError, ModelNotFoundError
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
from inhouse.llm.service import GENERATIVE_TASKS, LLMService, ServedModel
from inhouse.llm.tool_parsers import detect_tool_parser
from inhouse.llm.types import SamplingParams
from inhouse.protocols import openai
from inhouse.protocols.errors import as_inhouse_error, ollama_error_body
from inhouse.protocols.llm_http import (
    LenientModel,
    StreamedAnswer,
    first_and_rest,
    json_response,
    parse_json_model,
    until_disconnected,
)
from inhouse.security.pii import PieceTexts
from inhouse.security.pipeline import Guard, Texts, guarded, map_all_texts

log = logging.getLogger(__name__)

# The Ollama release whose API this adapter follows; clients gate features on it.
OLLAMA_API_VERSION = "0.12.0"
NDJSON = "application/x-ndjson"


class Options(LenientModel):
    """The ``options`` inhouse honours (https://github.com/ollama/ollama/blob/main/docs/modelfile.md
    #valid-parameters-and-values); the others (llama.cpp runtime knobs such as ``num_gpu``) are
    accepted and logged."""

    num_ctx: int | None = Field(default=None, ge=1)
    num_predict: int | None = Field(default=None, ge=-2)
    temperature: float | None = Field(default=None, ge=0)
    top_k: int | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    repeat_penalty: float | None = Field(default=None, gt=0)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)


class ChatBody(LenientModel):
    """https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-chat-completion"""

    model: str
    messages: list[Any] = Field(default_factory=list)
    tools: list[Any] | None = None
    think: bool | str | None = None
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool = True
    keep_alive: str | float | None = None
    # inhouse never truncates a prompt nor shifts the context: over-long requests are refused
    truncate: bool | None = None
    shift: bool | None = None


class GenerateBody(LenientModel):
    """https://github.com/ollama/ollama/blob/main/docs/api.md#generate-a-completion"""

    model: str
    prompt: str | None = None
    suffix: str | None = None
    images: list[Any] | None = None
    think: bool | str | None = None
    format: str | dict[str, Any] | None = None
    options: Options | None = None
    system: str | None = None
    template: str | None = None
    stream: bool = True
    raw: bool = False
    keep_alive: str | float | None = None
    context: list[int] | None = None


class EmbedBody(LenientModel):
    """https://github.com/ollama/ollama/blob/main/docs/api.md#generate-embeddings"""

    model: str
    input: str | list[str]
    truncate: bool = True
    options: Options | None = None
    keep_alive: str | float | None = None
    dimensions: int | None = Field(default=None, ge=1)


class EmbeddingsBody(LenientModel):
    """The legacy ``/api/embeddings``: one ``prompt``, one ``embedding``."""

    model: str
    prompt: str
    options: Options | None = None
    keep_alive: str | float | None = None


class ShowBody(LenientModel):
    model: str
    verbose: bool = False


# ---- request translation ----------------------------------------------------------------------
def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")


def _iso(ts: float) -> str:
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat().replace("+00:00", "Z")


def _log_ignored(path: str, body: LenientModel) -> None:
    options = getattr(body, "options", None)
    extra = sorted((options.model_extra or {}).keys()) if isinstance(options, Options) else []
    if extra:
        log.info("options accepted but ignored", extra={"path": path, "options": extra})
    keep_alive = getattr(body, "keep_alive", None)
    if keep_alive in (0, "0", "0s", "0m"):
        # models stay loaded for every client: unloading is an admin action (the repository API)
        log.info("keep_alive 0 accepted; the model stays loaded", extra={"path": path})


def _format(value: str | dict[str, Any] | None) -> JsonFormat | None:
    if value is None or value == "":
        return None
    if value == "json":
        return JsonFormat(None)
    if isinstance(value, dict):
        return JsonFormat(value)
    raise InvalidRequestError(f"format must be \"json\" or a JSON schema object, not {value!r}.",
                              details={"param": "format"})


def _stops(stop: str | list[str] | None) -> list[str]:
    if stop is None:
        return []
    return [s for s in ([stop] if isinstance(stop, str) else stop) if s]


def _sampling(options: Options | None, served: ServedModel) -> tuple[SamplingParams, int | None]:
    """Sampling from ``options`` (Ollama's defaults where unset) and the context window the
    request asks for (``num_ctx``), checked against the model's."""
    o = options or Options()
    limit = served.max_model_len
    if o.num_ctx is not None and limit is not None and o.num_ctx > limit:
        raise ContextLengthError(
            f"options.num_ctx {o.num_ctx} is larger than model '{served.id}''s context window of {limit} "
            f"tokens; use num_ctx {limit} or less.", details={"param": "options.num_ctx"})
    if o.num_predict == 0:
        raise InvalidRequestError("options.num_predict must be a positive number of tokens, or -1 for no limit.",
                                  details={"param": "options.num_predict"})
    sampling = SamplingParams(
        max_tokens=o.num_predict if o.num_predict is not None and o.num_predict > 0 else None,
        temperature=0.8 if o.temperature is None else o.temperature,
        top_p=0.9 if o.top_p is None else o.top_p,
        top_k=40 if o.top_k is None else o.top_k,
        seed=o.seed,
        stop=_stops(o.stop),
        repetition_penalty=1.1 if o.repeat_penalty is None else o.repeat_penalty,
        presence_penalty=o.presence_penalty or 0.0,
        frequency_penalty=o.frequency_penalty or 0.0,
    )
    num_ctx = o.num_ctx if o.num_ctx is not None and (limit is None or o.num_ctx < limit) else None
    return sampling, num_ctx


def _with_images(content: Any, images: Any, where: str) -> Any:
    """Ollama's ``images`` (base64 strings beside the text) as OpenAI content parts, so they meet
    the same checks and engines as ``image_url`` data URLs: a text-only model still answers 400."""
    if not images:
        return content
    if not isinstance(images, list) or not all(isinstance(x, str) for x in images):
        raise InvalidRequestError(f"{where} must be a list of base64-encoded images.", details={"param": where})
    parts: list[dict[str, Any]] = [{"type": "text", "text": content}] if isinstance(content, str) and content else []
    # the media type is a placeholder: the format is read from the bytes themselves
    parts += [{"type": "image_url", "image_url": {"url": f"data:image/*;base64,{x}"}} for x in images]
    return parts


def to_openai_messages(messages: list[Any], model: str) -> list[dict[str, Any]]:
    """Ollama messages (``images``, ``thinking``, ``tool_calls`` with object arguments,
    ``tool_name`` on tool results) → OpenAI-form messages for the chat normaliser."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidRequestError(f"messages[{i}] must be an object with 'role' and 'content'.",
                                      details={"param": f"messages[{i}]"})
        msg = {k: v for k, v in m.items() if k not in ("images", "thinking", "tool_name")}
        if m.get("images"):
            msg["content"] = _with_images(m.get("content"), m["images"], f"messages[{i}].images")
        if isinstance(m.get("thinking"), str) and m["thinking"]:
            msg["reasoning_content"] = m["thinking"]
        if m.get("tool_name"):
            msg["name"] = m["tool_name"]
        out.append(msg)
    return normalize_messages(out, model)


def _think_kwargs(think: bool | str | None, mv: ModelVersion, model: str) -> dict[str, Any]:
    if think is None or (think is False and not mv.spec.reasoning_parser):
        return {}
    if think not in (True, False, "low", "medium", "high"):
        raise InvalidRequestError(f"think must be true, false, \"low\", \"medium\" or \"high\", not {think!r}.",
                                  details={"param": "think"})
    if not mv.spec.reasoning_parser:
        raise InvalidRequestError(f"Model '{model}' does not support thinking; leave 'think' out or set it false.",
                                  details={"param": "think"})
    return {"enable_thinking": think is not False}


# ---- rendering ----------------------------------------------------------------------------------
class Timing:
    """Nanosecond durations of one request, as Ollama reports them, from when the events came:
    setup (model lookup, template, grammar) until the prompt was accepted, prompt evaluation
    until the first output, generation until the end."""

    def __init__(self) -> None:
        self.start = time.perf_counter_ns()
        self.prompt_at = self.first_at = self.end_at = 0

    def saw(self, ev: Event) -> None:
        now = time.perf_counter_ns()
        if isinstance(ev, Prompt):
            self.prompt_at = self.prompt_at or now
        elif isinstance(ev, Usage):
            self.end_at = now
        elif not self.first_at:
            self.first_at = now

    def fields(self, usage: Usage) -> dict[str, int]:
        end = self.end_at or time.perf_counter_ns()
        prompt_at = self.prompt_at or end
        first = self.first_at or end
        return {"total_duration": end - self.start, "load_duration": prompt_at - self.start,
                "prompt_eval_count": usage.prompt_tokens, "prompt_eval_duration": first - prompt_at,
                "eval_count": usage.completion_tokens, "eval_duration": end - first}


def _done_reason(finish: str) -> str:
    return "length" if finish == "length" else "stop"


def _arguments(text: str) -> dict[str, Any]:
    """Tool-call arguments as the object Ollama sends (the service streams JSON text)."""
    try:
        value = orjson.loads(text) if text.strip() else {}
    except orjson.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {"value": value}


def _tool_call(name: str, arguments: str, index: int) -> dict[str, Any]:
    return {"function": {"index": index, "name": name, "arguments": _arguments(arguments)}}


Piece = Callable[[dict[str, Any]], dict[str, Any]]


def _chat_piece(part: dict[str, Any]) -> dict[str, Any]:
    return {"message": {"role": "assistant", "content": "", **part}}


def _generate_piece(part: dict[str, Any]) -> dict[str, Any]:
    part = dict(part)
    return {"response": part.pop("content", ""), **part}


async def _ndjson(events: AsyncIterator[Event], model: str, piece: Piece, timing: Timing) -> AsyncIterator[bytes]:
    """Service events → Ollama's stream: text and thinking pieces as they come, each tool call
    whole once its arguments are complete, then the ``done`` line with counts and durations."""
    def line(doc: dict[str, Any]) -> bytes:
        return orjson.dumps({"model": model, "created_at": _now(), **doc}) + b"\n"

    calls: list[list[Any]] = []  # [name, arguments] of the choice's calls not yet sent
    sent = 0
    finish = "stop"

    def flush() -> bytes | None:
        nonlocal sent
        if len(calls) <= sent:
            return None
        out = [_tool_call(n, a, sent + i) for i, (n, a) in enumerate(calls[sent:])]
        sent = len(calls)
        return line({**piece({"tool_calls": out}), "done": False})

    try:
        async for ev in events:
            timing.saw(ev)
            if isinstance(ev, TextDelta) and ev.text:
                yield line({**piece({"content": ev.text}), "done": False})
            elif isinstance(ev, ReasoningDelta) and ev.text:
                yield line({**piece({"thinking": ev.text}), "done": False})
            elif isinstance(ev, ToolCallStart):
                calls.append([ev.name, ""])
            elif isinstance(ev, ToolCallArgs):
                calls[ev.call][1] += ev.fragment
            elif isinstance(ev, ChoiceEnd):
                finish = ev.finish_reason
                done_calls = flush()
                if done_calls is not None:
                    yield done_calls
            elif isinstance(ev, Usage):
                yield line({**piece({}), "done": True, "done_reason": _done_reason(finish), **timing.fields(ev)})
    except Exception as exc:  # after the headers: in-band, as Ollama reports errors in a stream
        yield orjson.dumps(ollama_error_body(as_inhouse_error(exc))) + b"\n"


def ndjson_response(body: AsyncIterator[bytes]) -> StreamedAnswer:
    """A client that disconnects closes ``body``, which ends the generation."""
    return StreamedAnswer(body, NDJSON, {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ---- what the security layer reads: request texts as OpenAI's, and streamed lines ------------
def stream_texts(doc: Any, pieces: PieceTexts) -> list[Any]:
    """One streamed line: its answer text (``message.content`` or ``response``) and thinking go
    through ``pieces``, so a placeholder split between lines is joined first; the ``done`` line
    flushes what is held back."""
    if not isinstance(doc, dict):
        return [doc]
    final = doc.get("done") is True
    message = doc.get("message")
    holder, text_key = (message, "content") if isinstance(message, dict) else (doc, "response")
    for key, held in ((text_key, "text"), ("thinking", "thinking")):
        if isinstance(holder.get(key), str) or (final and held in pieces.held):
            holder[key] = pieces.piece(held, holder.get(key) or "", final)
    return [map_all_texts(doc, pieces.fn)]


TEXTS = Texts(request=openai.map_request_texts, tools=openai.request_tools, stream=stream_texts)
_LIST = Guard("ollama.models", "infer")


class OllamaRoutes:
    def __init__(self, service: LLMService, manager: ModelManager, max_request_bytes: int) -> None:
        self.service = service
        self.manager = manager
        self.limit = max_request_bytes
        self._sizes: dict[tuple[str, str], int] = {}

    # ---- models ---------------------------------------------------------------------------------
    def _served(self, name: str, tasks: tuple[str, ...]) -> tuple[ServedModel, ModelVersion]:
        for m in self.service.served_models(tasks):
            if m.id == name:
                return m, self.manager.resolve(m.model)
        other = next((m for m in self.service.served_models() if m.id == name), None)
        if other is not None:
            raise InvalidRequestError(f"Model '{name}' is a '{other.task}' model; this endpoint needs a "
                                      f"{' / '.join(tasks)} model.", details={"param": "model"})
        known = ", ".join(m.id for m in self.service.served_models(tasks)) or "none"
        raise ModelNotFoundError(f"model '{name}' not found; this server serves: {known}.",
                                 details={"param": "model"})

    def _size(self, mv: ModelVersion) -> int:
        """Bytes on disk of the version's folder and its Hugging Face source, once per fingerprint."""
        key = (mv.name, mv.fingerprint)
        if key not in self._sizes:
            folder = self.manager.repository.model_dir(mv.name) / str(mv.version)
            roots = [folder]
            if mv.spec.source:
                source = Path(mv.spec.source)
                roots.append(source if source.is_absolute() else folder / source)
            seen: set[Path] = set()
            total = 0
            for root in roots:
                for f in root.rglob("*") if root.is_dir() else []:
                    real = f.resolve()
                    if real not in seen and real.is_file():
                        seen.add(real)
                        total += real.stat().st_size
            self._sizes[key] = total
        return self._sizes[key]

    def _details(self, mv: ModelVersion) -> dict[str, Any]:
        dtype = mv.spec.dtype
        return {"parent_model": "", "format": mv.spec.backend, "family": "", "families": None,
                "parameter_size": "", "quantization_level": "" if dtype == "auto" else dtype.upper()}

    def _entry(self, m: ServedModel, mv: ModelVersion) -> dict[str, Any]:
        return {"name": m.id, "model": m.id, "modified_at": _iso(mv.loaded_at), "size": self._size(mv),
                "digest": hashlib.sha256(mv.fingerprint.encode()).hexdigest(), "details": self._details(mv)}

    @guarded(Guard("ollama.version", "infer"))
    async def version(self, request: Request) -> Response:
        return json_response({"version": OLLAMA_API_VERSION, "inhouse": __version__})

    @guarded(_LIST)
    async def tags(self, request: Request) -> Response:
        models = [self._entry(m, self.manager.resolve(m.model)) for m in self.service.served_models(GENERATIVE_TASKS)]
        return json_response({"models": models})

    @guarded(_LIST)
    async def ps(self, request: Request) -> Response:
        out = []
        for m in self.service.served_models():
            if m.id != m.model:  # aliases are the same loaded model
                continue
            mv = self.manager.resolve(m.model)
            device = mv.spec.instances.device
            size = self._size(mv)
            # loaded until an admin unloads it: Ollama's "forever" (a negative keep_alive) is a far date
            out.append({**self._entry(m, mv), "expires_at": "9999-12-31T23:59:59Z",
                        "size_vram": 0 if device == "cpu" else size, "context_length": m.max_model_len})
        return json_response({"models": out})

    @guarded(Guard("ollama.show", "infer", model="model"))
    async def show(self, request: Request) -> Response:
        body = await parse_json_model(request, ShowBody, self.limit)
        m, mv = self._served(body.model, (*GENERATIVE_TASKS, "embedding"))
        engine = getattr(mv.model, "engine", None)
        template = mv.spec.chat_template or getattr(getattr(engine, "tokenizer", None), "chat_template", None) or ""
        if m.task == "embedding":
            capabilities = ["embedding"]
        else:
            capabilities = ["completion"]
            if mv.spec.tool_call_parser or detect_tool_parser(template):
                capabilities.append("tools")
            if mv.spec.reasoning_parser:
                capabilities.append("thinking")
        arch = mv.spec.backend
        info: dict[str, Any] = {"general.architecture": arch, "general.basename": m.model,
                                f"{arch}.context_length": m.max_model_len}
        return json_response({
            "modelfile": f"# served by inhouse {__version__} from its model repository\nFROM {m.model}\n",
            "parameters": "", "template": template, "details": self._details(mv), "model_info": info,
            "capabilities": capabilities, "modified_at": _iso(mv.loaded_at)})

    # ---- chat and generate ----------------------------------------------------------------------
    async def _fit_context(self, req: ChatRequest | CompletionRequest, num_ctx: int | None, mv: ModelVersion) -> None:
        """A smaller ``num_ctx`` than the model's window: the prompt and the answer must fit it."""
        if num_ctx is None:
            return
        if isinstance(req, ChatRequest):
            n = await self.service.count_tokens(req)
        else:  # a raw prompt, tokenized as the service will
            tokenizer = getattr(getattr(mv.model, "engine", None), "tokenizer", None)
            if tokenizer is None:
                raise ModelNotFoundError(f"model '{req.model}' was unloaded mid-request; retry.")
            ids = await asyncio.to_thread(tokenizer, req.prompts[0], add_special_tokens=True)
            n = len(ids["input_ids"])
        if n >= num_ctx:
            raise ContextLengthError(f"The prompt has {n} tokens, which does not leave room for an answer in "
                                     f"options.num_ctx {num_ctx}; raise num_ctx or shorten the prompt.",
                                     details={"param": "options.num_ctx"})
        room = num_ctx - n
        req.sampling.max_tokens = min(req.sampling.max_tokens or room, room)

    def _load_answer(self, model: str, piece: Piece, stream: bool) -> Response:
        """An empty request loads the model in Ollama; here it is loaded already."""
        doc = {"model": model, "created_at": _now(), **piece({}), "done": True, "done_reason": "load"}
        if stream:
            return Response(orjson.dumps(doc) + b"\n", media_type=NDJSON)
        return json_response(doc)

    async def _answer(self, request: Request, events: AsyncIterator[Event], model: str, piece: Piece, stream: bool,
                      timing: Timing) -> Response:
        if stream:
            first, rest = await first_and_rest(events, request)
            timing.saw(first)
            return ndjson_response(_ndjson(rest, model, piece, timing))

        async def collect() -> list[Event]:
            out = []
            async for ev in events:
                timing.saw(ev)
                out.append(ev)
            return out

        done = aggregate(await until_disconnected(request, collect()), 1)
        c = done.choices[0]
        part: dict[str, Any] = {"content": c.text}
        if c.reasoning:
            part["thinking"] = c.reasoning
        if c.tool_calls:
            part["tool_calls"] = [_tool_call(t.name, t.arguments, i) for i, t in enumerate(c.tool_calls)]
        return json_response({"model": model, "created_at": _now(), **piece(part), "done": True,
                              "done_reason": _done_reason(c.finish_reason), **timing.fields(done.usage)})

    @guarded(Guard("ollama.chat", "infer", model="model", texts=TEXTS))
    async def chat(self, request: Request) -> Response:
        timing = Timing()
        body = await parse_json_model(request, ChatBody, self.limit)
        _log_ignored(request.url.path, body)
        served, mv = self._served(body.model, GENERATIVE_TASKS)
        if not body.messages:
            return self._load_answer(body.model, _chat_piece, body.stream)
        sampling, num_ctx = _sampling(body.options, served)
        req = ChatRequest(model=body.model, messages=to_openai_messages(body.messages, body.model),
                          sampling=sampling, tools=normalize_tools(body.tools),
                          response_format=_format(body.format),
                          template_kwargs=_think_kwargs(body.think, mv, body.model))
        await self._fit_context(req, num_ctx, mv)
        return await self._answer(request, self.service.chat(req), body.model, _chat_piece, body.stream, timing)

    @guarded(Guard("ollama.generate", "infer", model="model", texts=TEXTS))
    async def generate(self, request: Request) -> Response:
        timing = Timing()
        body = await parse_json_model(request, GenerateBody, self.limit)
        _log_ignored(request.url.path, body)
        served, mv = self._served(body.model, GENERATIVE_TASKS)
        if body.images and body.raw:
            raise InvalidRequestError("images cannot go with raw: true (a raw prompt has no place for them); send "
                                      "them without raw, or use /api/chat.", details={"param": "images"})
        if body.suffix:
            raise InvalidRequestError(f"Model '{body.model}' does not support insert ('suffix'); send the prompt "
                                      "alone.", details={"param": "suffix"})
        if body.template:
            raise InvalidRequestError("'template' is not supported: inhouse renders prompts with the model's own "
                                      "chat template; leave it out, or send raw: true with the full prompt.",
                                      details={"param": "template"})
        if body.context:
            raise InvalidRequestError("'context' (the token context of an earlier answer) is not supported; use "
                                      "/api/chat with the conversation's messages.", details={"param": "context"})
        if not body.prompt:
            return self._load_answer(body.model, _generate_piece, body.stream)
        sampling, num_ctx = _sampling(body.options, served)
        fmt = _format(body.format)
        events: AsyncIterator[Event]
        if body.raw:
            raw = CompletionRequest(model=body.model, prompts=[body.prompt], sampling=sampling, response_format=fmt)
            await self._fit_context(raw, num_ctx, mv)
            events = self.service.complete(raw)
        else:
            messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
                {"role": "user", "content": _with_images(body.prompt, body.images, "images")}]
            req = ChatRequest(model=body.model, messages=normalize_messages(messages, body.model), sampling=sampling,
                              response_format=fmt, template_kwargs=_think_kwargs(body.think, mv, body.model))
            await self._fit_context(req, num_ctx, mv)
            events = self.service.chat(req)
        return await self._answer(request, events, body.model, _generate_piece, body.stream, timing)

    # ---- embeddings -----------------------------------------------------------------------------
    @guarded(Guard("ollama.embed", "infer", model="model", texts=TEXTS))
    async def embed(self, request: Request) -> Response:
        timing = Timing()
        body = await parse_json_model(request, EmbedBody, self.limit)
        _log_ignored(request.url.path, body)
        self._served(body.model, ("embedding",))
        inputs = [body.input] if isinstance(body.input, str) else list(body.input)
        vectors, tokens, _ = await until_disconnected(request, self.service.embed(body.model, inputs))
        if body.dimensions is not None:
            if body.dimensions > vectors.shape[1]:
                raise InvalidRequestError(f"dimensions {body.dimensions} is larger than the model's "
                                          f"{vectors.shape[1]}.", details={"param": "dimensions"})
            vectors = vectors[:, : body.dimensions]
            norms = np.linalg.norm(vectors, axis=1, keepdims=True)
            vectors = vectors / np.where(norms == 0, 1, norms)
        total = time.perf_counter_ns() - timing.start
        return json_response({"model": body.model, "embeddings": np.asarray(vectors, dtype=np.float32).tolist(),
                              "total_duration": total, "load_duration": 0, "prompt_eval_count": tokens})

    @guarded(Guard("ollama.embeddings", "infer", model="model", texts=TEXTS))
    async def embeddings(self, request: Request) -> Response:
        body = await parse_json_model(request, EmbeddingsBody, self.limit)
        _log_ignored(request.url.path, body)
        self._served(body.model, ("embedding",))
        vectors, _, _ = await until_disconnected(request, self.service.embed(body.model, [body.prompt]))
        return json_response({"embedding": np.asarray(vectors[0], dtype=np.float32).tolist()})


    # ---- model management: inhouse serves its repository, nothing is pulled or created ----------
    @guarded(Guard("ollama.manage", "infer"))
    async def manage(self, request: Request) -> Response:
        raise InvalidRequestError(
            f"{request.url.path} is not supported: inhouse serves the models in its repository. Put the model's "
            "folder in the repository and load it (inhouse models load NAME, or POST "
            "/v2/repository/models/NAME/load with an admin key).")


def build_router(service: LLMService, manager: ModelManager, max_request_bytes: int) -> APIRouter:
    routes = OllamaRoutes(service, manager, max_request_bytes)
    router = APIRouter(prefix="/api", tags=["Ollama"])
    router.add_api_route("/version", routes.version, methods=["GET"])
    router.add_api_route("/tags", routes.tags, methods=["GET"])
    router.add_api_route("/ps", routes.ps, methods=["GET"])
    router.add_api_route("/show", routes.show, methods=["POST"])
    router.add_api_route("/chat", routes.chat, methods=["POST"])
    router.add_api_route("/generate", routes.generate, methods=["POST"])
    router.add_api_route("/embed", routes.embed, methods=["POST"])
    router.add_api_route("/embeddings", routes.embeddings, methods=["POST"])
    # listed (so schema fuzzing reaches them) though they only answer that they are not supported
    for path in ("/pull", "/push", "/create", "/copy"):
        router.add_api_route(path, routes.manage, methods=["POST"])
    router.add_api_route("/delete", routes.manage, methods=["DELETE"])
    return router
