"""The continuous-batching generation engine.

One engine thread owns the model and the KV cache and loops: take new and aborted requests,
admit waiting sequences into free cache slots (reusing cached prefixes), run ONE forward step
over every running sequence — a decode token each, plus prompt chunks of newly admitted ones up
to ``max_num_batched_tokens`` — sample, detokenise, and hand the chunks to the asyncio side.
New requests therefore join the running batch between decode steps, and HTTP stays responsive
because the event loop never runs the model."""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import threading
import time
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from inhouse.core.recorders import NULL_LLM_RECORDER, LLMRecorder
from inhouse.errors import InferenceError, InvalidRequestError, ModelNotReadyError, QueueFullError
from inhouse.llm.context_window import check_context
from inhouse.llm.detokenizer import IncrementalDetokenizer
from inhouse.llm.kv_cache import KVCache
from inhouse.llm.runner import DecoderRunner, StepRow
from inhouse.llm.sampler import Sampled, SamplerState, make_generator, sample
from inhouse.llm.types import FinishReason, GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob

log = logging.getLogger(__name__)

Sink = Callable[[GenerationChunk], None]

# tokens of decode growth kept free per running sequence when admitting by tokens held, so that a
# new admission does not force a preemption a few steps later
_GROWTH_RESERVE = 16


@dataclass
class EngineConfig:
    max_model_len: int
    max_num_seqs: int
    max_num_batched_tokens: int
    max_waiting: int = 1024


@dataclass(eq=False)
class _Seq:
    request: GenerationRequest
    sink: Sink
    tokens: list[int]  # prompt + generated; the last one may not be computed yet
    prompt_len: int
    sampler: SamplerState
    detok: IncrementalDetokenizer
    eos_ids: frozenset[int]
    max_total: int  # stop with 'length' once len(tokens) reaches it
    slot: int = -1
    computed: int = 0  # positions whose K/V are in the cache
    cached: int = 0
    generated: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)
    finished: bool = False
    finish_reason: FinishReason | None = None
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float = 0.0
    preempted: int = 0  # times its KV memory was taken back for older sequences (it recomputes)
    first_token_at: float = 0.0
    last_emit_at: float = 0.0


class Engine:
    """Implements ``inhouse.llm.types.LLMEngine`` (plus ``start`` / ``close`` / ``submit``)."""

    def __init__(self, *, model: Any, tokenizer: Any, cache: KVCache, config: EngineConfig,
                 chat_template: str | None = None, eos_token_ids: Sequence[int] = (), name: str = "model") -> None:
        self.tokenizer = tokenizer
        self.max_model_len = config.max_model_len
        self.name = name
        self.config = config
        self.cache = cache
        self._runner = DecoderRunner(model, cache)
        self._chat_template = chat_template
        self._eos = frozenset(int(t) for t in eos_token_ids)
        self._inbox: collections.deque[tuple[str, Any]] = collections.deque()
        self._wake = threading.Event()
        self._waiting: collections.deque[_Seq] = collections.deque()
        self._running: list[_Seq] = []
        self._stopped = False
        self._thread: threading.Thread | None = None
        self._ids = itertools.count()
        self._failure: str | None = None
        self.stats = {"steps": 0, "prompt_tokens": 0, "cached_tokens": 0, "generated_tokens": 0, "preempted": 0}
        self.recorder: LLMRecorder = NULL_LLM_RECORDER

    # ---- lifecycle --------------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name=f"inhouse-engine-{self.name}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stopped = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._thread = None

    # ---- the LLMEngine contract ----------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                            *, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        try:
            ids = self.tokenizer.apply_chat_template(
                list(messages), tools=list(tools) if tools else None, chat_template=self._chat_template,
                add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False, **template_kwargs)
        except Exception as err:  # jinja2 errors, raise_exception() in templates, missing template
            raise InvalidRequestError(f"The chat template of model '{self.name}' rejected the messages: {err}") \
                from None
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[GenerationChunk] = asyncio.Queue()

        def sink(chunk: GenerationChunk) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, chunk)

        seq = self.submit(request, sink)
        done = False
        try:
            while True:
                chunk = await queue.get()
                while not queue.empty() and chunk.finish_reason is None:
                    chunk = _merge(chunk, queue.get_nowait())
                done = chunk.finish_reason is not None
                yield chunk
                if done:
                    return
        finally:
            if not done:
                self.abort(seq)

    # ---- thread-safe submission ----------------------------------------------------------------
    def validate(self, request: GenerationRequest) -> None:
        n = len(request.prompt_token_ids)
        want = request.sampling.max_tokens
        if n == 0:
            raise InvalidRequestError("The prompt is empty; send at least one token of input.")
        if want is not None and want < 1:
            raise InvalidRequestError(f"max_tokens must be at least 1, got {want}.")
        check_context(self.max_model_len, n, want or 0)
        _check_sampling(request.sampling)
        vocab = self._runner.embed.num_embeddings
        bad = [t for t in request.prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"Prompt token ids must lie in [0, {vocab}); got {bad[:5]}.")

    def submit(self, request: GenerationRequest, sink: Sink) -> _Seq:
        """Queue a request; ``sink`` is called from the engine thread with every chunk."""
        if self._failure is not None:
            raise ModelNotReadyError(f"The generation engine of model '{self.name}' stopped: {self._failure}")
        if self._stopped:
            raise ModelNotReadyError(f"Model '{self.name}' is unloading; retry on another version or later.")
        self.validate(request)
        if len(self._waiting) + len(self._inbox) >= self.config.max_waiting:
            raise QueueFullError(
                f"Model '{self.name}' has {len(self._waiting)} requests waiting for a free slot (rate limit "
                f"of its queue); retry after a few seconds.", headers={"Retry-After": "2"})
        p = request.sampling
        prompt = list(request.prompt_token_ids)
        max_total = self.max_model_len if p.max_tokens is None else len(prompt) + p.max_tokens
        seq = _Seq(request=request, sink=sink, tokens=prompt, prompt_len=len(prompt),
                   sampler=SamplerState(p, request.constraint, prompt,
                                        make_generator(p.seed, self._runner.device)),
                   detok=IncrementalDetokenizer(self.tokenizer, prompt, p.stop),
                   eos_ids=frozenset(p.stop_token_ids) | (frozenset() if p.ignore_eos else self._eos),
                   max_total=min(max_total, self.max_model_len))
        self._inbox.append(("add", seq))
        self._wake.set()
        return seq

    def abort(self, seq: _Seq) -> None:
        self._inbox.append(("abort", seq))
        self._wake.set()

    def generate_blocking(self, request: GenerationRequest, timeout: float | None = None) -> tuple[list[int], str, str]:
        """Run one request to completion from a non-event-loop thread: (token ids, text, reason)."""
        return self.generate_many_blocking([request], timeout)[0]

    def generate_many_blocking(self, requests: Sequence[GenerationRequest],
                               timeout: float | None = None) -> list[tuple[list[int], str, str]]:
        """Run requests together (they batch) from a non-event-loop thread."""
        done = threading.Semaphore(0)
        parts: list[list[GenerationChunk]] = [[] for _ in requests]

        def sink_for(i: int) -> Sink:
            def sink(chunk: GenerationChunk) -> None:
                parts[i].append(chunk)
                if chunk.finish_reason is not None:
                    done.release()
            return sink

        seqs = []
        try:
            for i, r in enumerate(requests):
                seqs.append(self.submit(r, sink_for(i)))
            deadline = None if timeout is None else time.monotonic() + timeout
            for _ in requests:
                left = None if deadline is None else max(0.0, deadline - time.monotonic())
                if not done.acquire(timeout=left):
                    raise InferenceError(f"Generation on model '{self.name}' did not finish in {timeout} s.")
        finally:
            for seq in seqs:
                if not seq.finished:
                    self.abort(seq)
        return [([t for c in p for t in c.token_ids], "".join(c.text for c in p), str(p[-1].finish_reason))
                for p in parts]

    def load(self) -> dict[str, int]:
        return {"running": sum(not s.finished for s in list(self._running)),
                "waiting": len(self._waiting) + len(self._inbox)}

    # ---- the engine thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while not self._stopped:
            self._drain_inbox()
            if not self._running and not self._waiting:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            try:
                self._step()
            except Exception as err:
                log.exception("generation step failed", extra={"model": self.name})
                for seq in self._running + list(self._waiting):
                    self._finish(seq, "error")
                self._running, self._waiting = [], collections.deque()
                if isinstance(err, torch.OutOfMemoryError | MemoryError):
                    continue  # the batch is dropped; the engine keeps serving smaller ones
        for seq in self._running + list(self._waiting):
            self._finish(seq, "cancelled")
        self._running, self._waiting = [], collections.deque()

    def _drain_inbox(self) -> None:
        while self._inbox:
            kind, seq = self._inbox.popleft()
            if kind == "add":
                self._enqueue(seq)
            elif not seq.finished:
                self._finish(seq, "cancelled", emit=False)
                if seq in self._running:
                    self._running.remove(seq)
                elif seq in self._waiting:
                    self._waiting.remove(seq)

    def _enqueue(self, seq: _Seq) -> None:
        """FIFO within a priority; a higher ``priority`` is admitted first."""
        prio = seq.request.priority
        if not self._waiting or self._waiting[-1].request.priority >= prio:
            self._waiting.append(seq)
            return
        for i, other in enumerate(self._waiting):
            if other.request.priority < prio:
                self._waiting.insert(i, seq)
                return

    def _admit(self) -> None:
        budget = self.cache.token_budget
        while self._waiting and len(self._running) < len(self.cache.slots) and self.cache.num_free:
            seq = self._waiting[0]
            if budget is not None and self._running:
                # room for its tokens and a few steps' growth of everyone, counting only what the
                # running sequences hold (free slots' cached prefixes are dropped when needed)
                held = sum(self.cache.slots[s.slot].high for s in self._running)
                if held + len(seq.tokens) + _GROWTH_RESERVE * (len(self._running) + 1) > budget:
                    break
            self._waiting.popleft()
            hit = self.cache.acquire(seq.tokens)
            seq.slot, seq.computed = hit.slot, hit.cached
            seq.admitted_at = time.monotonic()
            if not seq.preempted:
                seq.cached = hit.cached
                self.recorder.observe_prefix_cache(seq.prompt_len, hit.cached)
                self.stats["prompt_tokens"] += seq.prompt_len
                self.stats["cached_tokens"] += hit.cached
            self._running.append(seq)

    def _rows(self) -> tuple[list[_Seq], list[StepRow]]:
        """This step's work: every decoding sequence, then prefill chunks within the token budget."""
        decode = sorted((s for s in self._running if s.computed == len(s.tokens) - 1), key=lambda s: s.slot)
        in_decode = set(decode)
        budget = max(self.config.max_num_batched_tokens - len(decode), 1)
        rows = [StepRow(s.slot, s.computed, [s.tokens[-1]], True) for s in decode]
        stepped = list(decode)
        for s in self._running:
            todo = len(s.tokens) - s.computed
            if s in in_decode or budget <= 0:
                continue
            n = min(todo, budget)
            budget -= n
            stepped.append(s)
            end = s.computed + n
            rows.append(StepRow(s.slot, s.computed, s.tokens[s.computed:end], end == len(s.tokens)))
        return stepped, rows

    def _fit(self, rows: list[StepRow]) -> bool:
        """Make the memory this step writes fit the token budget: drop free slots' cached
        prefixes, then preempt the newest running sequence. False: rows must be rebuilt."""
        budget = self.cache.token_budget
        if budget is None:
            return True
        slots = self.cache.slots
        grow = sum(max(0, r.start + len(r.tokens) - slots[r.slot].high) for r in rows)
        over = self.cache.held + grow - budget
        if over <= 0:
            return True
        over -= self.cache.reclaim(over)
        if over <= 0 or len(self._running) <= 1:
            return True  # one sequence always fits: the budget holds max_model_len tokens
        victim = max(self._running, key=lambda s: s.admitted_at)
        self._running.remove(victim)
        self.cache.release(victim.slot)
        self.cache.trim(victim.slot, 0)
        victim.slot, victim.computed, victim.preempted = -1, 0, victim.preempted + 1
        self.stats["preempted"] += 1
        self._waiting.appendleft(victim)  # first back in, when memory frees up
        log.info("KV cache full: a sequence was preempted and will recompute",
                 extra={"model": self.name, "request_id": victim.request.request_id})
        return False

    def _step(self) -> None:
        now = time.monotonic()
        for seq in list(self._running) + list(self._waiting):
            if seq.request.deadline is not None and now > seq.request.deadline:
                self._finish(seq, "deadline")
        self._running = [s for s in self._running if not s.finished]
        self._waiting = collections.deque(s for s in self._waiting if not s.finished)
        self._admit()
        if not self._running:
            return
        stepped, rows = self._rows()
        while not self._fit(rows):
            stepped, rows = self._rows()
        self.cache.ensure_capacity(max(r.start + len(r.tokens) for r in rows))
        logits = self._runner.forward(rows)
        self.stats["steps"] += 1
        for s, r in zip(stepped, rows, strict=True):
            s.computed += len(r.tokens)
            self.cache.slots[s.slot].valid = s.computed
            self.cache.wrote(s.slot, s.computed)
        sampling = [s for s, r in zip(stepped, rows, strict=True) if r.want_logits]
        if sampling:
            for s, tok in zip(sampling, self._sample(logits, sampling), strict=True):
                if tok is None:
                    self._finish(s, "error", emit=False)
                else:
                    self._append(s, tok.token_id, tok.logprob, tok.top)
        self._emit()
        self._running = [s for s in self._running if not s.finished]

    def _sample(self, logits: torch.Tensor, seqs: list[_Seq]) -> list[Sampled | None]:
        """Sample every row; a row whose constraint fails ends alone ('error'), not the batch."""
        try:
            return list(sample(logits, [s.sampler for s in seqs]))
        except Exception:
            out: list[Sampled | None] = []
            for i, s in enumerate(seqs):
                try:
                    out.append(sample(logits[i:i + 1], [s.sampler])[0])
                except Exception:
                    log.exception("sampling failed", extra={"model": self.name, "request_id": s.request.request_id})
                    out.append(None)
            return out

    def _append(self, s: _Seq, token: int, logprob: float | None, top: list[tuple[int, float]] | None) -> None:
        if s.generated == 0:
            s.first_token_at = s.last_emit_at = time.monotonic()
            self.recorder.observe_time_to_first_token(s.first_token_at - s.arrival)
        s.generated += 1
        try:
            s.sampler.record(token)
        except Exception:  # a constraint that cannot advance: this sequence ends, the batch goes on
            log.exception("constraint rejected a token", extra={"model": self.name})
            self._finish(s, "error", emit=False)
            return
        s.pending_ids.append(token)
        self.stats["generated_tokens"] += 1
        if logprob is not None:
            s.pending_logprobs.append(TokenLogprob(
                token, self._token_text(token), logprob,
                [(t, self._token_text(t), lp) for t, lp in top or []]))
        reason: FinishReason | None = None
        if token in s.eos_ids:
            reason = "stop"
        else:
            s.detok.add(token)
            s.tokens.append(token)
            constraint = s.sampler.constraint
            if s.detok.stop_string is not None or (constraint is not None and constraint.is_finished()):
                reason = "stop"
            elif len(s.tokens) >= s.max_total:
                reason = "length"
        if reason is not None:
            self._finish(s, reason, emit=False)

    def _token_text(self, token: int) -> str:
        return str(self.tokenizer.decode([token], skip_special_tokens=False))

    def _emit(self) -> None:
        for s in self._running:
            if not s.pending_ids and not s.finished:
                continue
            reason = s.finish_reason
            text = s.detok.flush(final=reason is not None)
            chunk = GenerationChunk(
                token_ids=s.pending_ids, text=text, finish_reason=reason, prompt_tokens=s.prompt_len,
                completion_tokens=s.generated, cached_tokens=s.cached,
                logprobs=s.pending_logprobs or None if s.request.sampling.logprobs is not None else None,
                stop_string=s.detok.stop_string if reason == "stop" else None)
            s.pending_ids, s.pending_logprobs = [], []
            if len(chunk.token_ids) and s.generated > len(chunk.token_ids):
                now = time.monotonic()
                self.recorder.observe_inter_token_latency(now - s.last_emit_at, len(chunk.token_ids))
                s.last_emit_at = now
            self._deliver(s, chunk)
        if self.cache.token_budget is not None:
            self.recorder.set_kv_cache_usage(self.cache.held / self.cache.token_budget)
        else:
            used = sum(len(s.tokens) for s in self._running if not s.finished)
            self.recorder.set_kv_cache_usage(used / (len(self.cache.slots) * self.max_model_len))

    def _deliver(self, s: _Seq, chunk: GenerationChunk) -> None:
        try:
            s.sink(chunk)
        except RuntimeError:  # the consumer's event loop is gone: nobody listens any more
            if not s.finished:
                self._finish(s, "cancelled", emit=False)

    def _finish(self, s: _Seq, reason: FinishReason, *, emit: bool = True) -> None:
        if s.finished:
            return
        s.finished, s.finish_reason = True, reason
        if s.slot >= 0:
            self.recorder.observe_tokens(s.prompt_len, s.generated)
            self.cache.release(s.slot)
        if emit:
            chunk = GenerationChunk(token_ids=s.pending_ids, text=s.detok.flush(final=True), finish_reason=reason,
                                    prompt_tokens=s.prompt_len, completion_tokens=s.generated,
                                    cached_tokens=s.cached, logprobs=s.pending_logprobs or None)
            s.pending_ids, s.pending_logprobs = [], []
            self._deliver(s, chunk)


def _merge(a: GenerationChunk, b: GenerationChunk) -> GenerationChunk:
    logprobs = (a.logprobs or []) + (b.logprobs or []) if a.logprobs is not None or b.logprobs is not None else None
    return GenerationChunk(token_ids=a.token_ids + b.token_ids, text=a.text + b.text, finish_reason=b.finish_reason,
                           prompt_tokens=b.prompt_tokens, completion_tokens=b.completion_tokens,
                           cached_tokens=b.cached_tokens, logprobs=logprobs, stop_string=b.stop_string)


def _check_sampling(p: SamplingParams) -> None:
    problems = []
    if not (p.temperature >= 0):
        problems.append(f"temperature must be ≥ 0 (0 is greedy), got {p.temperature}")
    if not (0 < p.top_p <= 1):
        problems.append(f"top_p must lie in (0, 1], got {p.top_p}")
    if p.top_k < 0:
        problems.append(f"top_k must be ≥ 0 (0 turns it off), got {p.top_k}")
    if not (p.repetition_penalty > 0):
        problems.append(f"repetition_penalty must be > 0, got {p.repetition_penalty}")
    if p.logprobs is not None and not 0 <= p.logprobs <= 20:
        problems.append(f"logprobs must lie in [0, 20], got {p.logprobs}")
    if any(not isinstance(s, str) for s in p.stop):
        problems.append("stop must be a list of strings")
    if problems:
        raise InvalidRequestError("Invalid sampling parameters: " + "; ".join(problems) + ".")
