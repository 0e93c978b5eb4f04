"""What every engine that runs as a server child shares (``backend: llamacpp``, ``backend: vllm``):
the ``LLMEngine`` relay — readiness, error mapping, the token stream with its metrics, JSON
schema constraints handed to the child — and the loaded-model wrapper with v2 ``text_input``,
the crash hook and shutdown. Each engine says only how to phrase its request and read its
stream lines (``RelayEngine._request`` / ``_read``)."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import threading
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx
import numpy as np
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from inhouse.backends.child_server import ChildFailed, ServerProcess
from inhouse.backends.child_stream import ChildStream, StreamBroken
from inhouse.core.recorders import LLMRecorder
from inhouse.core.spec import ModelSpec, TensorSpec
from inhouse.errors import (
    InferenceError,
    InhouseError,
    InvalidRequestError,
    ModelFormatError,
    ModelNotReadyError,
    ModelSpecError,
)
from inhouse.llm.context_window import overflow
from inhouse.llm.types import FinishReason, GenerationChunk, GenerationRequest

log = logging.getLogger(__name__)

E = TypeVar("E", bound="RelayEngine")

METRICS_MAX_AGE_S = 5.0  # how old the child's metrics may be when a scrape shows them


def check_relayable(spec: ModelSpec, backend: str, reader: str, files: str) -> None:
    """What a relayed engine can serve: generation tasks, from plain files (the child reads
    them from disk itself, so nothing encrypted at rest)."""
    if spec.task not in ("chat", "generate"):
        raise ModelSpecError(f"Model '{spec.name}': the {backend} backend serves task 'chat' or 'generate', "
                             f"not '{spec.task}'.")
    if spec.encryption is not None:
        raise ModelFormatError(f"Model '{spec.name}': {reader} reads its {files} from disk, so the {backend} "
                               "backend cannot serve a model encrypted at rest; remove 'encryption'.")


def launch(spec: ModelSpec, child: ServerProcess, progress: Callable[[float, str], None] | None,
           make_engine: Callable[[], E], *, starting: str, label: str, failed: str) -> E:
    """Start the child, then build its engine and warm it up; a child whose engine fails is
    stopped. ``starting`` names the child in the load progress, ``label`` the engine in the log,
    ``failed`` what could not be served, in the load error."""
    if progress is not None:
        progress(10, f"starting {starting}")
    try:
        child.start()
    except ChildFailed as err:
        raise ModelFormatError(f"Model '{spec.name}': {failed}: {err}") from None
    try:
        engine = make_engine()
        if progress is not None:
            progress(95, "warming up")
        engine.warm_up()
        engine.read_engine_metrics()  # the first scrape after the load shows them
    except BaseException:
        child.stop()
        raise
    log.info(f"{label} model ready", extra={"model": spec.name, "pid": child.pid,
                                           "max_model_len": engine.max_model_len})
    return engine


@dataclass(slots=True)
class SchemaConstraint:
    """A JSON schema the child enforces itself (as a grammar); the token-level hooks of
    ``TokenConstraint`` are no-ops because no token mask crosses the process boundary."""

    schema: dict[str, Any]

    def allowed_mask(self, vocab_size: int) -> np.ndarray | None:
        return None

    def accept(self, token_id: int) -> None:
        return None

    def is_finished(self) -> bool:
        return False


@dataclass(slots=True)
class StreamState:
    """One generation's running counts, updated by ``_read``."""

    request: GenerationRequest
    prompt_tokens: int
    completion_tokens: int = 0
    finished: bool = False
    pending_finish: FinishReason | None = None  # seen, but the chunk with the totals is still to come
    extra: dict[str, Any] = field(default_factory=dict)


# the KV cache in use (0–1) as engines name it: vLLM's V1 engine, its V0 engine, older llama-server
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "llamacpp:kv_cache_usage_ratio")


def read_metrics(text: str) -> tuple[list[Metric], float | None]:
    """An engine's ``/metrics`` text as metric families, and the fraction of its KV cache in use
    (the largest, when it reports several engines; None when it does not say); ``([], None)``
    for a text that cannot be read."""
    try:
        families = list(text_string_to_metric_families(text))
    except Exception:  # prometheus_client's parser raises more than ValueError on bad input
        log.warning("an engine's metrics could not be read", exc_info=True)
        return [], None
    usage = [s.value for fam in families if fam.name in _KV_USAGE for s in fam.samples]
    return families, max(usage) if usage else None


def error_text(body: str) -> str:
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        err = json.loads(body)["error"]
        return str(err["message"] if isinstance(err, dict) else err)
    return body[:300]


def _prompt_too_long(body: str) -> int | None:
    """The prompt's token count when the child refused it as longer than its context
    (llama-server's ``exceed_context_size_error``)."""
    with contextlib.suppress(ValueError, AttributeError, TypeError, KeyError):
        err = json.loads(body)["error"]
        if err["type"] == "exceed_context_size_error":
            return int(err["n_prompt_tokens"])
    return None


def post(client: httpx.Client, path: str, body: dict[str, Any], label: str) -> dict[str, Any]:
    try:
        r = client.post(path, json=body)
    except httpx.TransportError as err:
        raise InferenceError(f"{label} is not reachable ({type(err).__name__}); retry shortly.") from None
    if r.status_code == 400:
        raise InvalidRequestError(f"{label} refused the request: {error_text(r.text)}")
    if r.status_code != 200:
        raise InferenceError(f"{label} answered {path} with HTTP {r.status_code}: {error_text(r.text)}")
    data: dict[str, Any] = r.json()
    return data


class RelayEngine:
    """An ``LLMEngine`` that relays to a server child; closing a ``generate`` stream closes its
    HTTP stream, which makes the child cancel the request and free its slot."""

    max_model_len: int  # set by each engine from what its child serves

    def __init__(self, spec: ModelSpec, child: ServerProcess) -> None:
        self._spec = spec
        self._child = child
        self._client = httpx.Client(transport=child.transport(), base_url=child.base_url, headers=child.headers,
                                    timeout=httpx.Timeout(600, connect=10))
        self._aclient: httpx.AsyncClient | None = None
        self.recorder: LLMRecorder | None = None
        self._metric_families: list[Metric] = []
        self._metrics_at = -math.inf
        self._metrics_lock = threading.Lock()
        self._metrics_reading = False

    # ---- the child's own metrics ----------------------------------------------------------
    def engine_metrics(self) -> list[Metric]:
        """The child's ``/metrics`` families as last read (read once, parsed once), none before a
        read answered. A copy older than ``METRICS_MAX_AGE_S`` starts a new read on a thread, so a scrape never
        waits on the child: llama-server answers ``/metrics`` from its main loop, after the
        batch it is computing (seconds, for a long prompt)."""
        with self._metrics_lock:
            stale = time.monotonic() - self._metrics_at > METRICS_MAX_AGE_S
            if stale and not self._metrics_reading and self._child.state == "ready":
                self._metrics_reading = True
                threading.Thread(target=self.read_engine_metrics, name="inhouse-engine-metrics", daemon=True).start()
            return self._metric_families

    def read_engine_metrics(self) -> None:
        """Read the child's ``/metrics`` now (blocking); a child without them keeps none."""
        text: str | None = None
        child = self._child
        try:
            # a client of its own: this runs on a thread beside the engine's calls, and may outlive
            # the engine's client (an unload closes it)
            with httpx.Client(transport=child.transport(), base_url=child.base_url, headers=child.headers,
                              timeout=10) as client:
                r = client.get("/metrics")
            if r.status_code == 200 and r.headers.get("content-type", "").startswith("text/plain"):
                text = r.text
        except (httpx.HTTPError, OSError):
            pass  # a child that is restarting or gone: the last copy stays until it answers again
        families, usage = read_metrics(text) if text is not None else (None, None)
        with self._metrics_lock:
            self._metrics_at = time.monotonic()
            self._metrics_reading = False
            if families is not None:
                self._metric_families = families
        if usage is not None and self.recorder is not None:
            self.recorder.set_kv_cache_usage(usage)

    async def _request(self, client: httpx.AsyncClient, request: GenerationRequest) -> tuple[str, dict[str, Any]]:
        """(path, JSON body) of a streamed generation; ``client`` reaches the child if it must be asked first."""
        raise NotImplementedError

    def _read(self, data: dict[str, Any], state: StreamState) -> GenerationChunk | None:
        """One stream event as a chunk (``finish_reason`` set on the last), or None to skip it."""
        raise NotImplementedError

    def complete_blocking(self, prompt: str, max_tokens: int) -> str:
        raise NotImplementedError

    def schema_constraint(self, schema: dict[str, Any]) -> SchemaConstraint:
        """Used by ``LLMService`` instead of compiling a token grammar here."""
        return SchemaConstraint(schema)

    def warm_up(self) -> None:
        self.complete_blocking("Hello", 2)

    def _require_ready(self) -> None:
        state = self._child.state
        if state == "ready":
            return
        if state == "restarting":
            raise ModelNotReadyError(f"Model '{self._spec.name}' is restarting after a crash "
                                     f"({self._child.reason}); retry shortly.", headers={"Retry-After": "2"})
        raise InferenceError(f"Model '{self._spec.name}' is not running: {self._child.reason or state}. Reload it.")

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        self._require_ready()
        if self._aclient is None:  # bound to the event loop that serves requests
            self._aclient = httpx.AsyncClient(transport=self._child.async_transport(), base_url=self._child.base_url,
                                              headers=self._child.headers, timeout=httpx.Timeout(None, connect=10))
        label = self._child.label
        started = last = time.monotonic()
        state = StreamState(request, len(request.prompt_token_ids))
        cached = 0  # prompt tokens the child reused from its cache, as its events tell
        try:
            path, body = await self._request(self._aclient, request)
            async with ChildStream(self._child.address, path, body, self._child.headers) as r:
                if r.status != 200:
                    raise self._refused(r.status, await r.body(), request)
                async for data in r.events():
                    if "error" in data:
                        raise InferenceError(f"{label} failed while generating: {error_text(json.dumps(data))}")
                    before = state.completion_tokens
                    chunk = self._read(data, state)
                    if chunk is None:
                        continue
                    cached = max(cached, chunk.cached_tokens)
                    now = time.monotonic()
                    if self.recorder is not None and state.completion_tokens > before:
                        if before == 0:
                            self.recorder.observe_time_to_first_token(now - started)
                        else:
                            self.recorder.observe_inter_token_latency(now - last, state.completion_tokens - before)
                        last = now
                    yield chunk
                    if chunk.finish_reason is not None:
                        state.finished = True
                        return
        except (httpx.TransportError, StreamBroken) as err:
            why = err if isinstance(err, StreamBroken) else type(err).__name__
            raise InferenceError(f"Model '{self._spec.name}': the connection to {label} broke "
                                 f"({why}); {self._child.reason or 'it may have crashed'}.") from None
        finally:
            if self.recorder is not None:
                self.recorder.observe_tokens(state.prompt_tokens, state.completion_tokens)
                if state.prompt_tokens:
                    self.recorder.observe_prefix_cache(state.prompt_tokens, cached)
            if not state.finished:
                log.debug("generation closed early", extra={"model": self._spec.name,
                                                            "request_id": request.request_id})
        # a stream that ended without its final chunk
        yield GenerationChunk([], "", state.pending_finish or "stop", state.prompt_tokens, state.completion_tokens)

    def _refused(self, status: int, body: str, request: GenerationRequest) -> InhouseError:
        label = self._child.label
        if status != 400:
            return InferenceError(f"{label} answered HTTP {status}: {error_text(body)}")
        prompt_tokens = _prompt_too_long(body)
        if prompt_tokens is not None:  # the same 2030 as when the service counted the prompt itself
            return overflow(self.max_model_len, prompt_tokens, request.sampling.max_tokens or 0)
        return InvalidRequestError(f"{label} refused the request: {error_text(body)}")

    def close(self) -> None:
        # The async client belongs to the serving loop (this runs on a loader thread); its
        # connections end with the child, so it is dropped rather than closed here.
        self._aclient = None
        self._client.close()


class RelayModel:
    """A loaded model served by a child: ``engine`` for the LLM APIs, ``predict`` for v2 ``text_input``."""

    platform = "relay"

    def __init__(self, spec: ModelSpec, engine: RelayEngine, child: ServerProcess) -> None:
        self.spec = spec
        self.engine = engine
        self.child = child
        self.inputs = [TensorSpec(name="text_input", dtype="BYTES", shape=[-1])]
        self.outputs = [TensorSpec(name="text_output", dtype="BYTES", shape=[-1])]

    def set_llm_recorder(self, recorder: LLMRecorder) -> None:
        self.engine.recorder = recorder

    def on_failure(self, callback: Callable[[str], None]) -> None:
        """The manager's hook: ``callback(reason)`` once the child crashed and restarts are used up."""
        self.child.on_failure = callback

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        """v2: each ``text_input`` element is a raw prompt (no chat template); greedy, up to
        ``parameters.max_tokens`` (default 256) new tokens."""
        arr = np.asarray(inputs["text_input"])
        max_tokens = int(self.spec.parameters.get("max_tokens", 256))
        texts = [self.engine.complete_blocking(_text(x), max_tokens) for x in arr.ravel()]
        return {"text_output": np.array([t.encode() for t in texts], dtype=object).reshape(arr.shape)}

    def close(self) -> None:
        self.engine.close()
        self.child.stop()


def _text(x: Any) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("text_input must be UTF-8 text.") from None
    return str(x)
