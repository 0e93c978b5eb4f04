"""LLM serving logic shared by the OpenAI and Anthropic adapters: find the model (by name or
served alias), build the prompt from the chat template, check the context window, set up
constrained decoding, run one or more sequences on the engine and turn their text into
protocol-neutral events. Nothing here knows about HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from inhouse.core.manager import ModelManager, ModelVersion
from inhouse.core.response_cache import ResponseCache
from inhouse.core.spec import OverflowSpec
from inhouse.errors import (
    DeadlineExceededError,
    InferenceError,
    InhouseError,
    InvalidRequestError,
    ModelNotFoundError,
    PayloadTooLargeError,
    QueueFullError,
    UpstreamUnavailableError,
)
from inhouse.llm import constraint as cons
from inhouse.llm.chat import merge_consecutive
from inhouse.llm.context_window import check_context
from inhouse.llm.decoder import CallMode, ChoiceDecoder
from inhouse.llm.events import Event, Prompt, TextDelta, ToolCallStart, Usage, decode_events, encode_events
from inhouse.llm.images import ImageFetcher, ImageRef
from inhouse.llm.reasoning import get_reasoning_parser
from inhouse.llm.requests import ChatRequest, CompletionRequest, JsonFormat, new_call_id, request_canonical
from inhouse.llm.tool_parsers import detect_tool_parser, get_tool_parser
from inhouse.llm.types import (
    ChatInput,
    Embedder,
    GenerationChunk,
    GenerationRequest,
    LLMEngine,
    SamplingParams,
    TokenConstraint,
)

log = logging.getLogger(__name__)

GENERATIVE_TASKS = ("chat", "generate")


@dataclass(slots=True)
class ServedModel:
    id: str  # the name clients use
    model: str  # the repository model behind it
    task: str
    created: int
    max_model_len: int | None


class LLMService:
    def __init__(self, manager: ModelManager, *, max_pending: int = 512, timeout_s: float | None = None,
                 image_fetcher: ImageFetcher | None = None) -> None:
        self._manager = manager
        self._image_fetcher = image_fetcher
        self._max_pending = max_pending
        self._timeout_s = timeout_s
        self._pending: dict[str, int] = {}
        self.cache: ResponseCache | None = None  # the response cache (set by the server)

    # ---- models -------------------------------------------------------------------------
    def served_models(self, tasks: Sequence[str] = ("chat", "generate", "embedding")) -> list[ServedModel]:
        out: list[ServedModel] = []
        for name, versions in sorted(self._manager.serving().items()):
            mv = versions[0]
            if mv.spec.task not in tasks:
                continue
            ids = [name, *[s for s in mv.spec.served_names if s != name]]
            limit = _max_len(mv)
            out.extend(ServedModel(i, name, mv.spec.task, int(mv.loaded_at), limit) for i in ids)
        return out

    def _lookup(self, requested: str) -> str:
        """The repository name behind a requested model name or alias."""
        serving = self._manager.serving()
        if requested in serving:
            return requested
        for name, versions in serving.items():
            if requested in versions[0].spec.served_names:
                return name
        if requested in self._manager.repository.model_names():
            return requested  # known but not loaded: resolve() says why
        names = [m.id for m in self.served_models()]
        raise ModelNotFoundError(
            f"The model '{requested}' does not exist on this server. Served models: "
            f"{', '.join(names) or 'none'}.", details={"param": "model"})

    def require_model(self, requested: str) -> None:
        """Raises as a request for ``requested`` would (unknown: 404 listing the served names; not
        loaded or still loading: 503), so adapters can check the model before its input."""
        self._manager.resolve(self._lookup(requested))

    def is_generative(self, requested: str) -> bool:
        """True when ``requested`` (a name or alias) is a serving chat / generate model."""
        for name, versions in self._manager.serving().items():
            spec = versions[0].spec
            if requested == name or requested in spec.served_names:
                return spec.task in GENERATIVE_TASKS
        return False

    @contextlib.contextmanager
    def _use(self, requested: str, tasks: Sequence[str]) -> Iterator[ModelVersion]:
        name = self._lookup(requested)
        with self._manager.use(name) as mv:
            if mv.spec.task not in tasks:
                raise InvalidRequestError(
                    f"Model '{requested}' is a '{mv.spec.task}' model; this endpoint serves "
                    f"{' / '.join(tasks)} models. Use /v2/models/{name}/infer for it.", details={"param": "model"})
            yield mv

    @contextlib.contextmanager
    def _admit(self, name: str) -> Iterator[None]:
        count = self._pending.get(name, 0)
        if count >= self._max_pending:
            raise QueueFullError(
                f"Rate limit reached: model '{name}' already has {count} requests running or waiting "
                f"(llm_max_pending={self._max_pending}); retry shortly.", headers={"Retry-After": "1"})
        self._pending[name] = count + 1
        try:
            yield
        finally:
            self._pending[name] -= 1

    # ---- chat ---------------------------------------------------------------------------
    def chat(self, req: ChatRequest) -> AsyncIterator[Event]:
        """Events of ``req.n`` choices, then one Usage. Errors before the first event (unknown
        model, context overflow, overload) raise before anything is yielded."""
        spec = self._manager.serving_spec(req.model)
        if spec is None or spec.overflow is None:
            return self._maybe_cached(req, lambda r: self._chat(r, r.model))
        # an overflowed answer comes from another model: not cached under this one
        return self._chat_overflow(req, spec.overflow)

    async def _maybe_cached(self, req: ChatRequest | CompletionRequest,
                            run: Callable[[Any], AsyncIterator[Event]]) -> AsyncIterator[Event]:
        """``run(req)``'s events, or the same events from the response cache: only for
        deterministic sampling (temperature 0 or a seed) without logprobs, on a model that caches.
        An answer is stored once its last event went out, so a stream cut short stores nothing."""
        cache = self.cache
        s = req.sampling
        if cache is None or req.cache_tenant is None or s.logprobs is not None or (
                s.temperature > 0 and s.seed is None):
            async for ev in run(req):
                yield ev
            return
        with self._use(req.model, GENERATIVE_TASKS) as mv:
            ttl = cache.ttl_for(mv.spec)
            if ttl is None:
                async for ev in run(req):
                    yield ev
                return
            key = cache.key(mv.name, mv.version, mv.fingerprint, req.cache_tenant, request_canonical(req))
            value = await cache.get(mv.name, mv.version, key)
            if value is not None:
                for ev in decode_events(value):
                    if isinstance(ev, ToolCallStart):  # agents match tool results by id: never repeat one
                        ev.id = new_call_id()
                    yield ev
                return
            events: list[Event] = []
            async for ev in run(req):
                events.append(ev)
                yield ev
            await cache.put(key, encode_events(events), ttl)

    async def _chat_overflow(self, req: ChatRequest, rule: OverflowSpec) -> AsyncIterator[Event]:
        """``overflow`` for chat: past ``queue_above`` requests running or waiting here, the chat
        goes to ``rule.to``; while that one is down (or fails before answering), to the fallback."""
        limit = rule.when.queue_above
        if limit is None or self._pending.get(req.model, 0) <= limit:
            async for ev in self._chat(req, req.model):
                yield ev
            return
        target, why = self._manager.healthy(rule.to)
        if target is not None:
            started = False
            try:
                async for ev in self._chat(req, target.name):
                    started = True
                    yield ev
                return
            except UpstreamUnavailableError as err:
                if started:
                    raise
                why = err.message
        fallback = self._manager.fallback(req.model, rule, why)
        async for ev in self._chat(req, fallback.name):
            yield ev

    async def _chat(self, req: ChatRequest, model: str) -> AsyncIterator[Event]:
        with self._use(model, GENERATIVE_TASKS) as mv, self._admit(mv.name):
            relay = getattr(mv.model, "relay", None)
            if relay is not None:  # a model served by another endpoint (backend: upstream) answers whole chats
                async for ev in relay.chat(req):
                    yield ev
                return
            engine = _engine(mv)
            images = await self._images(mv, engine, req.messages)
            template_tools = req.tools if req.tool_choice != "none" else None
            prompt = await self._chat_prompt(engine, req.messages, template_tools, req.template_kwargs, text=True)
            sampling = self._fit(engine, req.sampling, None if isinstance(prompt, str) else len(prompt))
            mode, function = self._call_mode(req)
            constraint_for = await self._constraint_factory(engine, req, mode)
            parser_cls = None
            if mode == "parse":
                pname = mv.spec.tool_call_parser or detect_tool_parser(_template_text(engine, mv),
                                                                       getattr(engine, "model_type", None))
                parser_cls = get_tool_parser(pname) if pname else None
            reasoning_cls = None
            if mv.spec.reasoning_parser and mode in ("text", "parse") and req.response_format is None:
                reasoning_cls = get_reasoning_parser(mv.spec.reasoning_parser)
            opens_think = reasoning_cls is not None and _prompt_opens_think(engine, prompt)

            def decoder(i: int) -> ChoiceDecoder:
                return ChoiceDecoder(
                    i, mode=mode, function=function,
                    tool_parser=parser_cls.create(req.tools) if parser_cls else None,
                    reasoning=reasoning_cls(opens_think) if reasoning_cls else None,
                )

            chat = ChatInput(req.messages, template_tools, req.template_kwargs) if images else None
            if not isinstance(prompt, str):  # a text prompt is announced once the engine has counted it (_run)
                yield Prompt(len(prompt), req.n)
            async for ev in self._run(engine, req.request_id, [prompt] * req.n, sampling, constraint_for,
                                      decoder, req.timeout_s, req.priority, images=images, chat=chat):
                yield ev

    async def _chat_prompt(self, engine: LLMEngine, messages: list[dict[str, Any]],
                           tools: list[dict[str, Any]] | None, kwargs: dict[str, Any], *,
                           text: bool) -> list[int] | str:
        """The chat rendered by the model's template: with ``text``, the text itself for an engine
        that tokenizes it (``render_chat``, on the event loop), else token ids (off the loop)."""
        render = getattr(engine, "render_chat", None) if text else None

        async def attempt(turns: list[dict[str, Any]]) -> list[int] | str:
            if render is not None:
                return str(await render(turns, tools, add_generation_prompt=True, **kwargs))
            return await asyncio.to_thread(
                lambda: list(engine.apply_chat_template(turns, tools, add_generation_prompt=True, **kwargs)))

        try:
            return await attempt(messages)
        except Exception as first:
            # Templates that insist on alternating roles get consecutive user turns merged.
            merged = merge_consecutive(messages)
            if merged != messages:
                with contextlib.suppress(Exception):
                    return await attempt(merged)
            if isinstance(first, InhouseError):
                raise
            raise InvalidRequestError(
                f"The model's chat template cannot render this conversation: {first}", details={"param": "messages"}
            ) from None

    def _call_mode(self, req: ChatRequest) -> tuple[CallMode, str | None]:
        if not req.tools or req.tool_choice == "none":
            return "text", None
        if req.tool_choice == "auto":
            return "parse", None
        if req.tool_choice == "required":
            return "required", None
        names = [t["function"]["name"] for t in req.tools]
        if req.tool_choice not in names:
            raise InvalidRequestError(
                f"tool_choice names function '{req.tool_choice}', which is not in 'tools' "
                f"({', '.join(names)}).", details={"param": "tool_choice"})
        return "named", req.tool_choice

    async def _constraint_factory(self, engine: LLMEngine, req: ChatRequest | CompletionRequest,
                                  mode: CallMode) -> Any:
        schema: dict[str, Any] | None
        if isinstance(req, ChatRequest) and mode == "required":
            assert req.tools is not None
            schema = cons.tool_calls_schema(req.tools, parallel=req.parallel_tool_calls)
        elif isinstance(req, ChatRequest) and mode == "named":
            assert req.tools is not None
            fn = next(t["function"] for t in req.tools if t["function"]["name"] == req.tool_choice)
            schema = fn.get("parameters") or {"type": "object"}
        elif req.response_format is not None:
            schema = req.response_format.schema if req.response_format.schema is not None else {"type": "object"}
        else:
            return None
        native = getattr(engine, "schema_constraint", None)
        if native is not None:  # an engine in another process (llama-server) enforces the schema itself
            return lambda: native(schema)
        # llguidance compiles (and, once per tokenizer, indexes the vocabulary) off the event loop;
        # a bad schema raises a 400
        grammar = await asyncio.to_thread(cons.compile_json_schema, engine.tokenizer, schema)
        return lambda: cons.GrammarConstraint(grammar)

    # ---- completions --------------------------------------------------------------------
    async def complete(self, req: CompletionRequest) -> AsyncIterator[Event]:
        """Events for every prompt × n (choice index = prompt index × n + k), then Usage."""
        async for ev in self._maybe_cached(req, self._complete):
            yield ev

    async def _complete(self, req: CompletionRequest) -> AsyncIterator[Event]:
        with self._use(req.model, GENERATIVE_TASKS) as mv, self._admit(mv.name):
            engine = _engine(mv)
            texts = [p for p in req.prompts if isinstance(p, str) and p]
            runs: list[list[int] | str]
            if getattr(engine, "render_chat", None) is not None and texts and len(texts) == len(req.prompts):
                # an engine that tokenizes text itself (llama-server) gets the text, as a chat's
                # rendered prompt: no tokenize call before it, and the count (and the cached
                # part) comes in its first event, checked against the window there (_run)
                sampling = self._fit(engine, req.sampling, None)
                runs = [p for p in texts for _ in range(req.n)]
                echo = texts if req.echo else None
                counted: int | None = None
            else:
                prompts = [await asyncio.to_thread(_encode, engine, p) for p in req.prompts]
                vocab = _vocab_size(engine)
                for i, p in enumerate(prompts):
                    if not p:
                        raise InvalidRequestError("The prompt is empty; send at least one token.",
                                                  details={"param": "prompt"})
                    bad = [t for t in p if t < 0 or t >= vocab]
                    if bad:
                        raise InvalidRequestError(
                            f"prompt[{i}] has token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}.",
                            details={"param": "prompt"})
                sampling = self._fit(engine, req.sampling, max(len(p) for p in prompts))
                runs = [p for p in prompts for _ in range(req.n)]
                echo = [engine.tokenizer.decode(p) for p in prompts] if req.echo else None
                counted = sum(len(p) for p in prompts)
            constraint_for = await self._constraint_factory(engine, req, "text")

            def decoder(i: int) -> ChoiceDecoder:
                return ChoiceDecoder(i)

            started: set[int] = set()
            if counted is not None:  # a text prompt is announced once the engine has counted it (_run)
                yield Prompt(counted, len(runs))
            async for ev in self._run(engine, req.request_id, runs, sampling, constraint_for, decoder,
                                      req.timeout_s, req.priority, count_prompt_once=False):
                if echo is not None and not isinstance(ev, Usage | Prompt) and ev.choice not in started:
                    started.add(ev.choice)
                    yield TextDelta(ev.choice, echo[ev.choice // req.n])
                yield ev

    async def _images(self, mv: ModelVersion, engine: LLMEngine, messages: list[dict[str, Any]]) -> list[bytes]:
        """The chat's images, in order, for an engine that reads them (``accepts_images``): a
        text-only model answers 400, bad image data or a URL off the allow-list 400, an image over
        ``max_image_bytes`` 413."""
        refs: list[ImageRef] = [ref for m in messages for ref in m.get("images", ())]
        if not refs:
            return []
        if not getattr(engine, "accepts_images", False):
            first = refs[0]
            raise InvalidRequestError(f"Model '{mv.name}' accepts text only, but {first.where} is an '{first.kind}' "
                                      "part. Remove the image/media part or send it to a vision-language model: "
                                      "images are served by backend: llamacpp with llamacpp.mmproj (the GGUF "
                                      "projector) and by backend: vllm.", details={"param": first.where})
        images: list[bytes] = []
        limit = mv.spec.max_image_bytes
        for ref in refs:
            url = ref.url or ""
            fetcher = self._image_fetcher
            if not url.startswith("data:") and fetcher is not None and fetcher.allowed(url):
                data = await fetcher.fetch(url, limit, ref.where)
            else:
                data = ref.decode()
            if len(data) > limit:
                raise PayloadTooLargeError(f"{ref.where} is an image of {len(data)} bytes, larger than model "
                                           f"'{mv.name}' accepts ({limit} bytes, max_image_bytes); send a smaller "
                                           "image.",
                                           details={"param": ref.where})
            images.append(data)
        return images

    # ---- shared generation path -----------------------------------------------------------
    def _fit(self, engine: LLMEngine, sampling: SamplingParams, prompt_len: int | None) -> SamplingParams:
        """``sampling`` with room for the prompt checked; ``prompt_len`` None: the engine counts the
        prompt, which ``_run`` checks on its first chunk."""
        limit = engine.max_model_len
        if sampling.max_tokens is not None and sampling.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1.", details={"param": "max_tokens"})
        if prompt_len is None:
            return sampling
        check_context(limit, prompt_len, sampling.max_tokens or 0)
        if sampling.max_tokens is None:
            return replace(sampling, max_tokens=limit - prompt_len)
        return sampling

    async def _run(self, engine: LLMEngine, request_id: str, prompts: Sequence[list[int] | str],
                   sampling: SamplingParams, constraint_for: Any, decoder_for: Any, timeout_s: float | None,
                   priority: int, count_prompt_once: bool = True, images: list[bytes] | None = None,
                   chat: ChatInput | None = None) -> AsyncIterator[Event]:
        """Events of every sequence, then Usage. Text prompts (``render_chat``) are checked against
        the context window on their first chunk, which carries the engine's count and comes before
        any token, and announced then (``Prompt``); without max_tokens they end with the window."""
        timeout = timeout_s if timeout_s is not None else self._timeout_s
        deadline = time.monotonic() + timeout if timeout is not None else None
        requests = []
        for i, prompt in enumerate(prompts):
            s = sampling if sampling.seed is None or i == 0 else replace(sampling, seed=sampling.seed + i)
            constraint: TokenConstraint | None = constraint_for() if constraint_for else None
            ids, text = ([], prompt) if isinstance(prompt, str) else (prompt, None)
            requests.append(GenerationRequest(f"{request_id}-{i}", ids, s, constraint, deadline, priority,
                                              images=list(images or ()), chat=chat, prompt_text=text))
        usage = Usage(0, 0)
        first: Callable[[GenerationChunk], Event | None] | None = None
        cap: int | None = None
        if requests and requests[0].prompt_text is not None:
            limit, announced = engine.max_model_len, False
            cap = limit if sampling.max_tokens is None else None

            def first(chunk: GenerationChunk) -> Event | None:
                nonlocal announced
                check_context(limit, chunk.prompt_tokens, sampling.max_tokens or 0)
                if announced:
                    return None
                announced = True
                return Prompt(chunk.prompt_tokens, len(requests))
        counted: dict[int, int] = {}  # sequence → its cached prompt tokens counted so far; -1: not counted

        def account(i: int, chunk: GenerationChunk) -> None:
            seen = counted.get(i)
            if seen is None:
                if count_prompt_once and counted:
                    counted[i] = -1
                    return
                usage.prompt_tokens += chunk.prompt_tokens
                seen = counted[i] = 0
            # an engine may know how much of the prompt it reused only at the end (llama-server
            # for a prompt of token ids)
            if seen >= 0 and chunk.cached_tokens > seen:
                usage.cached_tokens += chunk.cached_tokens - seen
                counted[i] = chunk.cached_tokens

        if len(requests) == 1:
            async for ev in _one(engine, requests[0], decoder_for(0), lambda c: account(0, c), usage, first, cap):
                yield ev
        else:
            queue: asyncio.Queue[Event | BaseException | None] = asyncio.Queue()

            async def pump(i: int) -> None:
                try:
                    async for ev in _one(engine, requests[i], decoder_for(i), lambda c: account(i, c), usage,
                                         first, cap):
                        await queue.put(ev)
                except BaseException as err:  # re-raised by the consumer
                    await queue.put(err)
                    return
                await queue.put(None)

            tasks = [asyncio.create_task(pump(i)) for i in range(len(requests))]
            try:
                done = 0
                while done < len(tasks):
                    item = await queue.get()
                    if item is None:
                        done += 1
                    elif isinstance(item, BaseException):
                        raise item
                    else:
                        yield item
            finally:
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        yield usage

    # ---- embeddings ---------------------------------------------------------------------
    async def embed(self, model: str, inputs: list[str] | list[list[int]]) -> tuple[np.ndarray, int, int]:
        """(embeddings [n, dim], input tokens, max_model_len)."""
        with self._use(model, ("embedding",)) as mv, self._admit(mv.name):
            embedder: Embedder | None = getattr(mv.model, "embedder", None)
            if embedder is None:
                raise InferenceError(f"Model '{model}' was unloaded mid-request; retry.")
            if not inputs:
                raise InvalidRequestError("'input' is empty; send at least one text.", details={"param": "input"})
            vectors, tokens = await embedder.embed(inputs)
            return vectors, tokens, embedder.max_model_len

    async def count_tokens(self, req: ChatRequest) -> int:
        with self._use(req.model, GENERATIVE_TASKS) as mv:
            engine = _engine(mv)
            prompt = await self._chat_prompt(engine, req.messages, req.tools, req.template_kwargs, text=False)
            return len(prompt)


async def _one(engine: LLMEngine, request: GenerationRequest, decoder: ChoiceDecoder, account: Any,
               usage: Usage, first: Callable[[GenerationChunk], Event | None] | None = None,
               cap: int | None = None) -> AsyncIterator[Event]:
    """One sequence: engine chunks → decoder events; closing it aborts the sequence. ``first``
    sees the first chunk (and may raise, or add an event); past ``cap`` prompt + completion
    tokens the sequence ends with "length"."""
    last_completion = 0
    async with contextlib.aclosing(engine.generate(request)) as chunks:
        async for chunk in chunks:
            if first is not None:
                announce, first = first(chunk), None
                if announce is not None:
                    yield announce
            account(chunk)
            usage.completion_tokens += chunk.completion_tokens - last_completion
            last_completion = chunk.completion_tokens
            for ev in decoder.feed(chunk.text, chunk.logprobs):
                yield ev
            reason = chunk.finish_reason
            if reason is None:
                if cap is None or chunk.prompt_tokens + chunk.completion_tokens < cap:
                    continue
                reason = "length"  # the window is full; the engine was not told where it ends
            if reason == "deadline":
                raise DeadlineExceededError(
                    f"The request's deadline passed after {chunk.completion_tokens} generated tokens.")
            if reason == "error":
                raise InferenceError("The model failed while generating; the server log has the details.")
            if reason == "cancelled":
                reason = "stop"
            for ev in decoder.finish(reason, chunk.stop_string):
                yield ev
            return
    for ev in decoder.finish("stop"):  # an engine that ended without a finish_reason
        yield ev


def _engine(mv: ModelVersion) -> LLMEngine:
    engine: LLMEngine | None = getattr(mv.model, "engine", None)
    if engine is None and getattr(mv.model, "relay", None) is not None:
        raise InvalidRequestError(f"Model '{mv.name}' is served by another endpoint, to which this server relays "
                                  "chat requests only; use the chat API (or v2 generate with 'messages').",
                                  details={"param": "model"})
    if engine is None:
        raise InferenceError(f"Model '{mv.name}' was unloaded mid-request; retry.")
    return engine



def _max_len(mv: ModelVersion) -> int | None:
    for attr in ("engine", "embedder"):
        obj = getattr(mv.model, attr, None)
        if obj is not None:
            return int(obj.max_model_len)
    return mv.spec.max_model_len


def _template_text(engine: LLMEngine, mv: ModelVersion) -> str | None:
    return mv.spec.chat_template or getattr(engine.tokenizer, "chat_template", None)


def _prompt_opens_think(engine: LLMEngine, prompt: list[int] | str) -> bool:
    tail = prompt if isinstance(prompt, str) else engine.tokenizer.decode(prompt[-8:], skip_special_tokens=False)
    return bool(tail.rstrip().endswith("<think>"))


def _encode(engine: LLMEngine, prompt: str | list[int]) -> list[int]:
    if isinstance(prompt, str):
        return list(engine.tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return list(prompt)


def _vocab_size(engine: LLMEngine) -> int:
    return len(engine.tokenizer)


def json_format(kind: str | None, schema: dict[str, Any] | None) -> JsonFormat | None:
    if kind in (None, "text"):
        return None
    return JsonFormat(schema)
