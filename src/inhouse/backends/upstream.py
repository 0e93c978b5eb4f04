"""``backend: upstream`` — a model served by another endpoint: another inhouse, a KServe v2 server
(``protocol: v2``, relayed with the binary tensor extension) or an OpenAI-compatible server
(``protocol: openai``, chat relayed as a stream).

The request has passed this server's keys, policy, PII rules and audit before it gets here, like
any other model's. What is added on the way out: the upstream's own key (read from a file or the
environment, never logged), TLS, a timeout, retries on connect errors only (a request that may
have reached the upstream is never sent twice), a circuit breaker, a periodic health check, and
``pii.outbound`` (numbered placeholders, restored in the answer; or refusal)."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import math
import os
import select
import socket
import ssl
import threading
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from inhouse.backends import LoadContext
from inhouse.backends.llamacpp import _messages_for_server
from inhouse.core.datatypes import array_from_json, array_from_raw, raw_bytes, v2_datatype
from inhouse.core.spec import ModelSpec, TensorSpec, UpstreamSpec
from inhouse.errors import (
    DeadlineExceededError,
    InferenceError,
    InhouseError,
    InvalidRequestError,
    ModelSpecError,
    PolicyBlockedError,
    QueueFullError,
    UpstreamUnavailableError,
)
from inhouse.llm.events import ChoiceEnd, Event, Prompt, ReasoningDelta, TextDelta, ToolCallArgs, ToolCallStart, Usage
from inhouse.llm.images import IMAGE_MARKER
from inhouse.llm.requests import ChatRequest
from inhouse.security.pii import PieceTexts, Redactor, Vault

log = logging.getLogger(__name__)

_CONNECT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout)
_TIMEOUTS = (httpx.ReadTimeout, httpx.WriteTimeout, httpx.PoolTimeout)
_HEADER_LENGTH = "inference-header-content-length"
_IDLE_REUSE_S = 4.0  # servers close idle keep-alive connections (uvicorn after 5 s by default)


class Circuit:
    """Closed while calls succeed; open for ``reset_s`` after ``failures`` failures in a row (calls
    fail at once, with the last reason); then one trial call decides. Used from instance threads
    and the event loop, hence the lock (held for a few field updates only)."""

    def __init__(self, name: str, failures: int, reset_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._name = name
        self._limit = failures
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial = False
        self.reason = ""

    def check(self) -> None:
        """Raises 3006 while open; lets one trial call through once ``reset_s`` has passed."""
        with self._lock:
            if self._opened_at is None:
                return
            left = self._opened_at + self._reset_s - self._clock()
            if left <= 0 and not self._trial:
                self._trial = True
                return
        retry = max(1, math.ceil(left))
        raise UpstreamUnavailableError(
            f"Model '{self._name}' is unavailable: its upstream failed ({self.reason}), so its circuit is "
            f"open; retry after about {retry} s.", headers={"Retry-After": str(retry)})

    def success(self) -> None:
        with self._lock:
            if self._opened_at is not None:
                log.info("upstream circuit closed", extra={"model": self._name})
            self._failures, self._opened_at, self._trial, self.reason = 0, None, False, ""

    def failure(self, reason: str) -> None:
        with self._lock:
            self._failures += 1
            self.reason = reason
            self._trial = False
            if self._failures >= self._limit or self._opened_at is not None:
                if self._opened_at is None:
                    log.warning("upstream circuit opened", extra={"model": self._name, "reason": reason})
                self._opened_at = self._clock()

    def trip(self, reason: str) -> None:
        """Open at once (a failed health check)."""
        with self._lock:
            self._failures = max(self._failures, self._limit)
        self.failure(reason)

    @property
    def open_reason(self) -> str | None:
        with self._lock:
            return self.reason if self._opened_at is not None else None


def _resolve(path: str, base: Path) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() else base / p


def _api_key(cfg: UpstreamSpec, name: str, base: Path) -> str | None:
    if cfg.api_key_env is not None:
        key = os.environ.get(cfg.api_key_env, "").strip()
        if not key:
            raise ModelSpecError(f"Model '{name}': upstream.api_key_env names {cfg.api_key_env}, which is not set; "
                                 "export the upstream's key in it.")
        return key
    if cfg.api_key_file is not None:
        path = _resolve(cfg.api_key_file, base)
        try:
            key = path.read_text(encoding="utf-8").strip()
        except OSError as err:
            raise ModelSpecError(f"Model '{name}': upstream.api_key_file {path} cannot be read "
                                 f"({err.strerror}).") from None
        if not key:
            raise ModelSpecError(f"Model '{name}': upstream.api_key_file {path} is empty.")
        return key
    return None


def _tls(cfg: UpstreamSpec, name: str, base: Path) -> ssl.SSLContext | bool:
    tls = cfg.tls
    if not cfg.url.startswith("https://"):
        if tls.ca_file or tls.cert_file:
            raise ModelSpecError(f"Model '{name}': upstream.tls is set but upstream.url is not https://.")
        return True
    try:
        ctx = ssl.create_default_context(cafile=str(_resolve(tls.ca_file, base)) if tls.ca_file else None)
        if tls.cert_file and tls.key_file:
            ctx.load_cert_chain(str(_resolve(tls.cert_file, base)), str(_resolve(tls.key_file, base)))
    except (OSError, ssl.SSLError) as err:
        raise ModelSpecError(f"Model '{name}': upstream.tls files cannot be used: {err}.") from None
    return ctx


def _error_text(r: httpx.Response) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text[:300]
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        err = err.get("message")
    return str(err if err is not None else body)[:300]


class UpstreamClient:
    """HTTP to the upstream, with the circuit, the timeout and connect-error retries. A blocking
    client for instance threads, an async one (made on first use, on the serving loop) for streams."""

    def __init__(self, spec: ModelSpec, base: Path) -> None:
        cfg = spec.upstream
        if cfg is None:  # the spec's validator guarantees it
            raise ModelSpecError(f"Model '{spec.name}' has no upstream section.")
        self.cfg = cfg
        self.name = spec.name
        self.remote = cfg.model or spec.name
        key = _api_key(cfg, spec.name, base)
        self._headers = {"authorization": f"Bearer {key}"} if key else {}
        self._verify = _tls(cfg, spec.name, base)
        self._timeout = httpx.Timeout(cfg.timeout_s, connect=cfg.connect_timeout_s)
        self.circuit = Circuit(spec.name, cfg.circuit.failures, cfg.circuit.reset_s)
        self._client = self._sync_client()
        self._aclient: httpx.AsyncClient | None = None
        self._local = threading.local()  # each instance thread's connection for post()
        self._prefix = httpx.URL(cfg.url).path.rstrip("/")

    def _sync_client(self) -> httpx.Client:
        return httpx.Client(base_url=self.cfg.url.rstrip("/"), headers=self._headers, verify=self._verify,
                            timeout=self._timeout)

    def _async_client(self) -> httpx.AsyncClient:
        if self._aclient is None:
            self._aclient = httpx.AsyncClient(base_url=self.cfg.url.rstrip("/"), headers=self._headers,
                                              verify=self._verify, timeout=self._timeout)
        return self._aclient

    def probe(self, path: str) -> httpx.Response:
        """One GET outside the circuit and without retries (health checks); its own client, so a
        check never waits behind busy connections."""
        with self._sync_client() as c:
            return c.get(path)

    def post(self, path: str, content: bytes, headers: dict[str, str]) -> httpx.Response:
        """A blocking POST on this thread's own keep-alive connection (http.client: an instance
        thread's call costs tens of microseconds, where a shared httpx.Client costs hundreds and
        serialises the threads on its pool)."""
        self.circuit.check()
        attempt = 0
        while True:
            try:
                conn = self._connection()
            except OSError as err:
                if attempt < self.cfg.retries:
                    time.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                raise self._down(err, attempt + 1) from None
            try:
                conn.request("POST", self._prefix + path, body=content, headers={**self._headers, **headers})
                resp = conn.getresponse()
                body = resp.read()
            except TimeoutError:
                self._drop()
                raise self._transport(httpx.ReadTimeout("timed out")) from None
            except (OSError, http.client.HTTPException) as err:
                self._drop()
                raise self._transport(httpx.ReadError(type(err).__name__)) from None
            self._local.used = time.monotonic()
            if resp.will_close:
                self._drop()
            return self._checked(httpx.Response(resp.status, headers=resp.getheaders(), content=body))

    def _connection(self) -> http.client.HTTPConnection:
        local = self._local
        conn: http.client.HTTPConnection | None = getattr(local, "conn", None)
        if conn is not None and time.monotonic() - local.used < _IDLE_REUSE_S and not _dropped(conn):
            return conn
        self._drop()  # a connection the server closed, or may be closing, is never reused for a POST
        url = httpx.URL(self.cfg.url)
        if url.scheme == "https":
            ctx = self._verify if isinstance(self._verify, ssl.SSLContext) else ssl.create_default_context()
            conn = http.client.HTTPSConnection(url.host, url.port or 443, timeout=self.cfg.connect_timeout_s,
                                               context=ctx)
        else:
            conn = http.client.HTTPConnection(url.host, url.port or 80, timeout=self.cfg.connect_timeout_s)
        conn.connect()  # OSError (refused, unreachable, TLS failure, connect timeout): nothing was sent
        if conn.sock is not None:
            conn.sock.settimeout(self.cfg.timeout_s)
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        local.conn, local.used = conn, time.monotonic()
        return conn

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    async def stream(self, path: str, body: dict[str, Any]) -> AsyncGenerator[str, None]:
        """The lines of a streamed answer; the status is checked before the first line."""
        self.circuit.check()
        client = self._async_client()
        attempt = 0
        while True:
            try:
                async with client.stream("POST", path, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        self._checked(r)
                    ok = False
                    async for line in r.aiter_lines():
                        if not ok:
                            ok = True
                            self.circuit.success()
                        yield line
                    if not ok:
                        self.circuit.success()
                    return
            except _CONNECT_ERRORS as err:
                if attempt < self.cfg.retries:
                    await asyncio.sleep(_backoff(attempt))
                    attempt += 1
                    continue
                raise self._down(err, attempt + 1) from None
            except httpx.TransportError as err:
                raise self._transport(err) from None

    def _down(self, err: Exception, attempts: int) -> UpstreamUnavailableError:
        reason = f"{type(err).__name__} connecting to {self.cfg.url} after {attempts} attempt(s)"
        self.circuit.failure(reason)
        return UpstreamUnavailableError(f"Model '{self.name}': its upstream is unreachable ({reason}); retry "
                                        "shortly.", headers={"Retry-After": "1"})

    def _transport(self, err: httpx.TransportError) -> InhouseError:
        if isinstance(err, _TIMEOUTS):
            reason = f"no answer within upstream.timeout_s ({self.cfg.timeout_s:g} s)"
            self.circuit.failure(reason)
            return DeadlineExceededError(f"Model '{self.name}': its upstream gave {reason}; it was not retried, "
                                         "since it may have run.")
        reason = f"the connection broke ({type(err).__name__})"
        self.circuit.failure(reason)
        return UpstreamUnavailableError(f"Model '{self.name}': {reason} while its upstream answered; retry.")

    def _checked(self, r: httpx.Response) -> httpx.Response:
        """The response when it is a success; otherwise the error to raise, counted by the circuit
        when it says the upstream (not the request) is at fault."""
        status = r.status_code
        if status < 400:
            self.circuit.success()
            return r
        text = _error_text(r)
        if status in (400, 422):
            self.circuit.success()  # the upstream works; this request is wrong
            raise InvalidRequestError(f"The upstream of model '{self.name}' refused the request: {text}")
        if status == 429:
            self.circuit.success()
            raise QueueFullError(f"The upstream of model '{self.name}' is busy: {text}",
                                 headers={"Retry-After": r.headers.get("retry-after", "1")})
        if status == 504:
            self.circuit.failure("deadline exceeded upstream")
            raise DeadlineExceededError(f"The upstream of model '{self.name}' ran out of time: {text}")
        if status in (401, 403):
            reason = f"the upstream refused this server's key (HTTP {status})"
            self.circuit.failure(reason)
            raise UpstreamUnavailableError(f"Model '{self.name}': {reason}; check upstream.api_key_env / "
                                           "api_key_file.")
        reason = f"HTTP {status}: {text}"
        self.circuit.failure(reason)
        raise UpstreamUnavailableError(f"The upstream of model '{self.name}' failed ({reason}).")

    def close(self) -> None:
        # the async client belongs to the serving loop (this runs on a loader thread); its
        # connections close with the process or are dropped with it
        self._aclient = None
        self._client.close()


def _dropped(conn: http.client.HTTPConnection) -> bool:
    """An idle keep-alive connection with something to read has been closed by the server (or
    carries bytes nobody asked for): sending on it would fail after the request left."""
    sock = conn.sock
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _backoff(attempt: int) -> float:
    return float(min(0.1 * 2**attempt, 1.0))


class Outbound:
    """``pii.outbound`` for one model: redact (numbered placeholders in a per-request vault),
    refuse (5001 naming what was found) or allow."""

    def __init__(self, spec: ModelSpec) -> None:
        self.mode = spec.pii.outbound if spec.pii is not None else "redact"
        detectors = spec.pii.detectors if spec.pii is not None else None
        self._redactor = Redactor(detectors) if detectors is not None else Redactor()
        self._name = spec.name

    def vault(self) -> Vault | None:
        return Vault() if self.mode == "redact" else None

    def text(self, text: str, vault: Vault | None) -> str:
        if self.mode == "allow":
            return text
        if self.mode == "refuse":
            found = self._redactor.find(text)
            if found:
                kinds = sorted({kind for _, _, kind in found})
                raise PolicyBlockedError(
                    f"Model '{self._name}' is served by another endpoint and its pii.outbound rule is 'refuse'; "
                    f"the request contains {', '.join(kinds)}. Remove it, or send it to a local model.")
            return text
        return self._redactor.redact(text, vault)

    def messages(self, messages: list[dict[str, Any]], vault: Vault | None) -> list[dict[str, Any]]:
        if self.mode == "allow":
            return messages
        out = []
        for m in messages:
            m = dict(m)
            content = m.get("content")
            if isinstance(content, str):
                m["content"] = self.text(content, vault)
            elif isinstance(content, list):
                m["content"] = [{**p, "text": self.text(p["text"], vault)}
                                if isinstance(p, dict) and isinstance(p.get("text"), str) else p for p in content]
            calls = m.get("tool_calls")
            if calls:
                m["tool_calls"] = [_redact_call(c, lambda t: self.text(t, vault)) for c in calls]
            out.append(m)
        return out


def _redact_call(call: dict[str, Any], fn: Callable[[str], str]) -> dict[str, Any]:
    f = dict(call.get("function", call))
    args = f.get("arguments")
    f["arguments"] = fn(args if isinstance(args, str) else json.dumps(args or {}))
    return {**call, "function": f}


class UpstreamBackend:
    name = "upstream"

    def load(self, ctx: LoadContext) -> UpstreamModel:
        spec = ctx.spec
        cfg = spec.upstream
        if cfg is None:
            raise ModelSpecError(f"Model '{spec.name}': backend upstream needs an 'upstream' section.")
        if cfg.protocol == "openai" and spec.task not in ("chat", "generate"):
            raise ModelSpecError(f"Model '{spec.name}': upstream.protocol openai serves task chat; set task: chat.")
        if cfg.protocol == "v2" and spec.task in ("chat", "generate", "embedding"):
            raise ModelSpecError(f"Model '{spec.name}': upstream.protocol v2 relays tensors (task tensor or "
                                 "classification); an upstream chat model needs protocol: openai.")
        client = UpstreamClient(spec, ctx.model_dir)
        try:
            model = UpstreamModel(spec, client)
            model.start_health_checks()
        except BaseException:
            client.close()
            raise
        return model


class UpstreamModel:
    """A loaded upstream model: ``predict`` relays v2 infer (or, for an OpenAI upstream, each
    ``text_input`` as one chat turn); ``relay`` is what ``LLMService`` hands a chat to."""

    platform = "upstream"

    def __init__(self, spec: ModelSpec, client: UpstreamClient) -> None:
        self.spec = spec
        self.client = client
        self._outbound = Outbound(spec)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.relay: ChatRelay | None = None
        inputs, outputs = self._check()  # fails the load with the reason when the upstream is not there
        self.inputs: list[TensorSpec] = spec.inputs or inputs
        self.outputs: list[TensorSpec] = spec.outputs or outputs
        if client.cfg.protocol == "openai":
            self.relay = ChatRelay(spec.name, client, self._outbound)

    # ---- health ---------------------------------------------------------------------------
    def _check(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        c = self.client
        try:
            if c.cfg.protocol == "openai":
                r = c.probe("/v1/models")
                c._checked(r)
                served = [str(m.get("id")) for m in r.json().get("data", [])]
                if c.remote not in served:
                    raise UpstreamUnavailableError(f"Model '{self.spec.name}': the upstream does not serve "
                                                   f"'{c.remote}'; it serves {', '.join(served) or 'nothing'}.")
                text = [TensorSpec(name="text_input", dtype="BYTES", shape=[-1])]
                return text, [TensorSpec(name="text_output", dtype="BYTES", shape=[-1])]
            ready = c.probe(f"/v2/models/{c.remote}/ready")
            c._checked(ready)
            meta = c._checked(c.probe(f"/v2/models/{c.remote}")).json()
            return _tensors(meta.get("inputs")), _tensors(meta.get("outputs"))
        except _CONNECT_ERRORS as err:
            raise UpstreamUnavailableError(f"Model '{self.spec.name}': its upstream {c.cfg.url} is unreachable "
                                           f"({type(err).__name__}).") from None
        except httpx.TransportError as err:
            raise UpstreamUnavailableError(f"Model '{self.spec.name}': the health check of {c.cfg.url} failed "
                                           f"({type(err).__name__}).") from None
        except ValueError:
            raise UpstreamUnavailableError(f"Model '{self.spec.name}': {c.cfg.url} answered its health check "
                                           "with something that is not JSON; is it an inference server?") from None

    def start_health_checks(self) -> None:
        self._thread = threading.Thread(target=self._health_loop, name=f"inhouse-upstream-{self.spec.name}",
                                        daemon=True)
        self._thread.start()

    def _health_loop(self) -> None:
        interval = self.client.cfg.health_interval_s
        while not self._stop.wait(interval):
            try:
                self._check()
            except InhouseError as err:
                self.client.circuit.trip(f"health check failed: {err.message}")
            else:
                if self.client.circuit.open_reason is not None:
                    self.client.circuit.success()

    def health(self) -> str | None:
        """Why the model cannot serve now (its circuit is open), or None: the manager shows it."""
        return self.client.circuit.open_reason

    # ---- v2 -------------------------------------------------------------------------------
    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        vault = self._outbound.vault()
        if self.client.cfg.protocol == "openai":
            arr = np.asarray(inputs["text_input"])
            texts = [self._complete(_utf8(x), vault) for x in arr.ravel()]
            return {"text_output": np.array([t.encode() for t in texts], dtype=object).reshape(arr.shape)}
        header: dict[str, Any] = {"inputs": [], "outputs": [{"name": n, "parameters": {"binary_data": True}}
                                                           for n in (outputs or [t.name for t in self.outputs])]}
        parts: list[bytes | memoryview] = []
        for name, arr in inputs.items():
            arr = np.asarray(arr)
            if arr.dtype.kind in ("O", "S", "U") and self._outbound.mode != "allow":
                arr = np.array([self._outbound.text(_utf8(x), vault).encode() for x in arr.ravel()],
                               dtype=object).reshape(arr.shape)
            data = raw_bytes(arr)
            header["inputs"].append({"name": name, "datatype": v2_datatype(arr.dtype), "shape": list(arr.shape),
                                     "parameters": {"binary_data_size": len(data)}})
            parts.append(data)
        head = json.dumps(header).encode()
        r = self.client.post(f"/v2/models/{self.client.remote}/infer", b"".join([head, *parts]),
                             {"content-type": "application/octet-stream", _HEADER_LENGTH: str(len(head))})
        result = _decode_v2(r, self.spec.name)
        if vault is not None and vault.originals:
            for name, arr in result.items():
                if arr.dtype.kind == "O":
                    result[name] = np.array([vault.restore(_utf8(x)).encode() for x in arr.ravel()],
                                            dtype=object).reshape(arr.shape)
        return result

    def _complete(self, prompt: str, vault: Vault | None) -> str:
        body = {"model": self.client.remote, "stream": False,
                "messages": [{"role": "user", "content": self._outbound.text(prompt, vault)}],
                "max_tokens": int(self.spec.parameters.get("max_tokens", 256)), "temperature": 0}
        r = self.client.post("/v1/chat/completions", json.dumps(body).encode(), {"content-type": "application/json"})
        try:
            text = str(r.json()["choices"][0]["message"].get("content") or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise InferenceError(f"The upstream of model '{self.spec.name}' answered with an unexpected "
                                 "body.") from None
        return vault.restore(text) if vault is not None else text

    def close(self) -> None:
        self._stop.set()
        self.client.close()


def _utf8(x: Any) -> str:
    if isinstance(x, bytes):
        try:
            return x.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidRequestError("Text sent to an upstream model must be UTF-8.") from None
    return str(x)


def _tensors(items: Any) -> list[TensorSpec]:
    if not isinstance(items, list):
        return []
    return [TensorSpec(name=str(t["name"]), dtype=str(t["datatype"]), shape=[int(d) for d in t["shape"]])
            for t in items if isinstance(t, dict)]


def _decode_v2(r: httpx.Response, name: str) -> dict[str, np.ndarray]:
    raw = r.content
    length = r.headers.get(_HEADER_LENGTH)
    try:
        head_len = int(length) if length is not None else len(raw)
        header = json.loads(raw[:head_len])
        out: dict[str, np.ndarray] = {}
        offset = head_len
        for t in header["outputs"]:
            shape = [int(d) for d in t["shape"]]
            size = (t.get("parameters") or {}).get("binary_data_size")
            if size is not None:
                out[t["name"]] = array_from_raw(t["name"], t["datatype"], shape, raw, offset, int(size))
                offset += int(size)
            else:
                out[t["name"]] = array_from_json(t["name"], t["datatype"], shape, t["data"])
        return out
    except (ValueError, KeyError, TypeError, InhouseError):
        raise InferenceError(f"The upstream of model '{name}' answered with a body that is not a v2 "
                             "inference response.") from None


class ChatRelay:
    """OpenAI chat relayed to the upstream as a stream, rendered as this server's events (so every
    LLM API here — OpenAI, Anthropic, v2 generate — serves an upstream model)."""

    def __init__(self, name: str, client: UpstreamClient, outbound: Outbound) -> None:
        self._name = name
        self._client = client
        self._outbound = outbound

    def _body(self, req: ChatRequest, vault: Vault | None) -> dict[str, Any]:
        s = req.sampling
        body: dict[str, Any] = {"model": self._client.remote, "stream": True,
                                "stream_options": {"include_usage": True},
                                "messages": self._outbound.messages(_upstream_messages(req.messages), vault),
                                "temperature": s.temperature, "top_p": s.top_p}
        if req.n != 1:
            body["n"] = req.n
        if s.max_tokens is not None:
            body["max_tokens"] = s.max_tokens
        if s.seed is not None:
            body["seed"] = s.seed
        if s.stop:
            body["stop"] = list(s.stop)
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.presence_penalty:
            body["presence_penalty"] = s.presence_penalty
        if req.tools:
            body["tools"] = req.tools
            choice = req.tool_choice
            body["tool_choice"] = choice if choice in ("auto", "none", "required") else {
                "type": "function", "function": {"name": choice}}
            body["parallel_tool_calls"] = req.parallel_tool_calls
        if req.response_format is not None:
            schema = req.response_format.schema
            body["response_format"] = {"type": "json_object"} if schema is None else {
                "type": "json_schema", "json_schema": {"name": "output", "schema": schema}}
        return body

    async def chat(self, req: ChatRequest) -> AsyncIterator[Event]:
        vault = self._outbound.vault()
        restore = PieceTexts(vault.restore if vault is not None else (lambda t: t))
        usage = Usage(0, 0)
        started: set[tuple[int, int]] = set()
        lines = self._client.stream("/v1/chat/completions", self._body(req, vault))
        try:
            first = True
            async for line in lines:
                if first:  # the upstream accepted the request: its errors were raised before this
                    yield Prompt(0, req.n)
                    first = False
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise InferenceError(f"The upstream of model '{self._name}' sent a stream chunk that is not "
                                         "JSON.") from None
                if chunk.get("usage"):
                    u = chunk["usage"]
                    cached = (u.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
                    usage = Usage(int(u.get("prompt_tokens") or 0), int(u.get("completion_tokens") or 0), int(cached))
                for ch in chunk.get("choices") or []:
                    for ev in self._choice(ch, restore, started):
                        yield ev
            if first:
                yield Prompt(0, req.n)
        finally:
            await lines.aclose()
        yield usage

    def _choice(self, ch: dict[str, Any], restore: PieceTexts, started: set[tuple[int, int]]) -> list[Event]:
        i = int(ch.get("index") or 0)
        delta = ch.get("delta") or {}
        finish = ch.get("finish_reason")
        out: list[Event] = []
        text = delta.get("content")
        if text or finish:
            restored = restore.piece((i, "text"), text or "", bool(finish))
            if restored:
                out.append(TextDelta(i, restored))
        reasoning = delta.get("reasoning_content")
        if reasoning:
            out.append(ReasoningDelta(i, reasoning))
        for call in delta.get("tool_calls") or []:
            k = int(call.get("index") or 0)
            f = call.get("function") or {}
            if (i, k) not in started:
                started.add((i, k))
                out.append(ToolCallStart(i, k, str(call.get("id") or ""), str(f.get("name") or "")))
            if f.get("arguments"):
                out.append(ToolCallArgs(i, k, restore.piece((i, k), str(f["arguments"]), False)))
        if finish:
            for (ci, k) in sorted(started):
                if ci == i:
                    held = restore.piece((i, k), "", True)
                    if held:
                        out.append(ToolCallArgs(i, k, held))
            out.append(ChoiceEnd(i, str(finish)))
        return out


def _upstream_messages(messages: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages in OpenAI's form for the upstream. Images are not relayed: the outbound PII rules
    read text only, so an image could leave the machine unchecked."""
    if any("images" in m or IMAGE_MARKER in str(m.get("content") or "") for m in messages):
        raise InvalidRequestError("This model is served by another endpoint (backend: upstream), and images are "
                                  "not relayed to it; send text only, or use a local vision-language model.")
    return _messages_for_server(messages, IMAGE_MARKER)
