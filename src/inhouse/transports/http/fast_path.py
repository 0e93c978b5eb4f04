"""The HTTP fast path: ``POST /v2/models/{m}[/versions/{v}]/infer`` answered straight from the
connection, without building an ASGI request around it.

uvicorn's httptools protocol spends, per request, more CPU than a small model does: an ASGI scope
dict, a request/response cycle object with an ``asyncio.Event``, ``receive``/``send`` message dicts,
two transport writes. :class:`FastInferProtocol` is that protocol with one change: when the
parser has the headers of a v2 infer request, it collects the body itself, hands the request to
:meth:`~inhouse.transports.http.infer_entry.InferEntry.answer` (the same function the ASGI entry calls:
security gate, inference, audit entry, metrics, access log) and writes the answer in one write.
Every other request (and an infer request it does not take: percent-encoded or absolute-form
target, ``Expect: 100-continue``, a request pipelined behind one in flight) goes through uvicorn
unchanged, so routing, streaming and WebSockets are uvicorn's as before.

Connection semantics follow uvicorn's: keep-alive and its timeout, ``Connection: close``,
HTTP/1.0, pipelined requests answered in order, graceful shutdown (in-flight answers finish,
then the connection closes), and a client that disconnects cancels its queued inference.
``http_fast_path: false`` in the settings turns this off. This module is the only code that
touches uvicorn's internals; the answer itself is :class:`~inhouse.transports.http.infer_entry.InferEntry`'s.

uvicorn pin: ``pyproject.toml`` allows only 0.54.x, because this subclass reads uvicorn's
protocol internals (parser callbacks, ``cycle``, ``pipeline``, ``flow``, keep-alive timer)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol

from inhouse.core.types import InferResponse
from inhouse.errors import CancelledError
from inhouse.protocols.http_body import check_declared_length, client_gone, decode_body, header_text, too_large
from inhouse.protocols.kserve_v2.rest import infer_target
from inhouse.transports.http.infer_entry import InferEntry, Reply, error_reply

_CRLF = b"\r\n"
_CLOSE = b"connection: close\r\n"


class _NoEvent:
    """What uvicorn's ``connection_lost`` pokes on the current cycle (``message_event.set()``)."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()


class _FastRequest:
    """One infer request taken by the fast path. While it is in flight it stands in as the
    connection's current cycle, so uvicorn queues a request pipelined behind it and its graceful
    shutdown waits for it (the attributes uvicorn reads on a cycle are here)."""

    __slots__ = ("body", "cancellable", "disconnected", "headers", "keep_alive", "model", "path",
                 "response_complete", "size", "task", "version")

    message_event = _NO_EVENT

    def __init__(self, path: str, model: str, version: str | None, headers: dict[bytes, bytes],
                 keep_alive: bool) -> None:
        self.path = path
        self.model = model
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body: list[bytes] = []
        self.size = 0
        self.response_complete = False
        self.disconnected = False
        self.cancellable = False
        self.task: asyncio.Task[None] | None = None

    async def guard(self, work: Any) -> InferResponse:
        """Awaits the inference; a client that disconnects meanwhile cancels it (a queued request
        then never runs), answered as 3003 in the audit log and the metrics."""
        self.cancellable = True
        try:
            result: InferResponse = await work
            return result
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.disconnected or task is None:
                raise
            raise client_gone(task) from None
        finally:
            self.cancellable = False

    def lost(self) -> None:
        self.disconnected = True
        if self.cancellable and self.task is not None:
            self.task.cancel()


class FastPathStats:
    """Requests the fast path answered (the rest went through uvicorn and the ASGI entry)."""

    __slots__ = ("answered",)

    def __init__(self) -> None:
        self.answered = 0


class FastInferProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, answering v2 infer itself (see the module docstring). Made
    per server by :func:`fast_protocol`, which binds the entry, the body limit and the stats."""

    entry: InferEntry
    limit: int
    stats: FastPathStats

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._taking: _FastRequest | None = None  # being parsed
        self._inflight: _FastRequest | None = None  # being answered
        self._active = 0.0  # loop time of the last data or answer: the keep-alive clock

    # ---- keep-alive: one timer per idle period, not one armed and cancelled per request ---------
    def _unset_keepalive_if_required(self) -> None:
        self._active = self.loop.time()  # called by uvicorn whenever data arrives

    def on_response_complete(self) -> None:
        # uvicorn's, except that a keep-alive timer already armed stays (it checks the clock)
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self._active = self.loop.time()
        self.flow.resume_reading()
        if self.pipeline:
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
        elif self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive,
                                                                self.timeout_keep_alive_handler)

    def timeout_keep_alive_handler(self) -> None:
        """Closes a connection idle for the keep-alive timeout; one busy or active since is
        checked again when its timeout would next run out."""
        self.timeout_keep_alive_task = None
        if self.transport.is_closing():
            return
        busy = (self._inflight is not None or self._taking is not None
                or (self.cycle is not None and not self.cycle.response_complete))
        idle = 0.0 if busy else self.loop.time() - self._active
        if idle < self.timeout_keep_alive:
            self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive - idle,
                                                                self.timeout_keep_alive_handler)
            return
        self.transport.close()

    # ---- parser callbacks -------------------------------------------------------------------
    def on_message_begin(self) -> None:
        # the ASGI scope is built only for requests that go to the application
        self.url = b""
        self.expect_100_continue = False
        self.headers = []
        self._taking = None

    def _build_scope(self) -> None:
        url, headers, expect = self.url, self.headers, self.expect_100_continue
        super().on_message_begin()
        self.url, self.headers, self.expect_100_continue = url, headers, expect
        self.scope["headers"] = headers

    def on_headers_complete(self) -> None:
        fast = self._take()
        if fast is None:
            self._build_scope()
            super().on_headers_complete()
            return
        self._taking = fast
        self.cycle = fast  # type: ignore[assignment]  # uvicorn reads only the attributes it has

    def _take(self) -> _FastRequest | None:
        parser = self.parser
        if (self._inflight is not None or self.expect_100_continue or self.limit_concurrency is not None
                or (self.cycle is not None and not self.cycle.response_complete)
                or parser.get_method() != b"POST" or parser.should_upgrade()):
            return None
        url = self.url
        end = url.find(b"?")
        raw = url if end < 0 else url[:end]
        if raw[:1] != b"/" or b"%" in raw or not raw.isascii():
            return None
        path = raw.decode("ascii")
        target = infer_target(path)
        if target is None:
            return None
        h = dict(self.headers)
        declared = h.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return None  # uvicorn's path answers 413 at once instead of reading the body first
        keep_alive = parser.get_http_version() != "1.0" and parser.should_keep_alive()
        return _FastRequest(path, target[0], target[1], h, keep_alive)

    def on_body(self, body: bytes) -> None:
        fast = self._taking
        if fast is None:
            super().on_body(body)
            return
        fast.size += len(body)
        if fast.size <= self.limit:
            fast.body.append(body)  # past the limit nothing is kept: the answer is 413

    def on_message_complete(self) -> None:
        fast = self._taking
        if fast is None:
            super().on_message_complete()
            return
        self._taking = None
        self._inflight = fast
        task = self.loop.create_task(self._answer(fast))
        fast.task = task
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    # ---- the answer ---------------------------------------------------------------------------
    async def _answer(self, fast: _FastRequest) -> None:
        start = time.perf_counter()
        self.stats.answered += 1
        h = fast.headers
        limit = self.limit

        async def read_body() -> bytes:
            check_declared_length(header_text(h.get(b"content-length")), limit)
            if fast.size > limit:
                raise too_large(limit)
            body = fast.body[0] if len(fast.body) == 1 else b"".join(fast.body)
            return decode_body(body, limit, header_text(h.get(b"content-encoding")))

        try:
            reply = await self.entry.answer(fast.path, fast.model, fast.version, h,
                                            self.client[0] if self.client else None, read_body, fast.guard,
                                            start)
        except (CancelledError, asyncio.CancelledError):
            reply = None  # the client is gone, or the server is stopping: nothing to write
            fast.keep_alive = False
        except Exception as exc:
            reply = error_reply(exc)  # an unexpected one is logged with a reference the client gets
            fast.keep_alive = False
        if reply is not None and not fast.disconnected:
            if self.flow.write_paused:
                await self.flow.drain()
            self.transport.write(self._render(reply, fast.keep_alive))
        self._done(fast)

    def _render(self, reply: Reply, keep_alive: bool) -> bytes:
        out = [STATUS_LINE[reply.status]]
        for name, value in self.server_state.default_headers:
            out += (name, b": ", value, _CRLF)
        for name, value in reply.headers:
            out += (name, b": ", value, _CRLF)
        if not keep_alive:
            out.append(_CLOSE)
        out += (_CRLF, reply.body)
        return b"".join(out)

    def _done(self, fast: _FastRequest) -> None:
        fast.response_complete = True
        self._inflight = None
        if not fast.keep_alive and not self.transport.is_closing():
            self.transport.close()
        self.on_response_complete()  # uvicorn's: start a pipelined request or arm the keep-alive timer

    def connection_lost(self, exc: Exception | None) -> None:
        fast = self._inflight
        if fast is not None and not fast.response_complete:
            fast.lost()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None
        super().connection_lost(exc)


def fast_protocol(entry: InferEntry, max_request_bytes: int) -> type[FastInferProtocol]:
    """The protocol class uvicorn instantiates per connection (``uvicorn.Config(http=...)``)."""
    return type("BoundFastInferProtocol", (FastInferProtocol,),
                {"entry": entry, "limit": max_request_bytes, "stats": FastPathStats()})
