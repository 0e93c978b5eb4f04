"""The gRPC edge of the security layer: a grpc.aio server interceptor over the same pipeline
the HTTP middleware runs (:mod:`inhouse.security.pipeline`). Each RPC's
:class:`~inhouse.security.pipeline.Guard` is declared by the servicer module that serves it
(``grpc_service.RPC_GUARDS``, ``openclaw_grpc.RPC_GUARDS``, ``health.RPC_GUARDS``); the API key comes from the
``authorization: Bearer`` or ``x-api-key`` metadata, the client address from the peer, and the
audit entry is committed before the answer is sent."""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

import grpc
import grpc.aio

from inhouse.errors import AuditUnavailableError, InhouseError
from inhouse.observability.context import current as current_request
from inhouse.protocols.errors import as_inhouse_error as as_error
from inhouse.protocols.errors import grpc_abort
from inhouse.protocols.kserve_v2.grpc_service import request_size
from inhouse.security.gate import Call, SecurityGate, new_request_id
from inhouse.security.pipeline import Exchange, Guard, as_served, check_request, open_call
from inhouse.transports.grpc.forward import FRONT_PEER, FRONT_SECRET
from inhouse.transports.grpc.intercept import CachedWrapInterceptor, RpcKind, Streaming, Unary


def declared_rpcs() -> dict[str, Guard]:
    """The guards the servicer modules declare, by full method name."""
    from inhouse.protocols import openclaw_grpc
    from inhouse.protocols.kserve_v2 import grpc_service
    from inhouse.transports.grpc import health

    return {**grpc_service.RPC_GUARDS, **openclaw_grpc.RPC_GUARDS, **health.RPC_GUARDS}


def guard_for(method: str, guards: Mapping[str, Guard]) -> Guard:
    """The declared guard of a full gRPC method name (looked up once per method, when it is
    wrapped). A method its own service left undeclared is admins' only (fail closed); one of a
    service nobody declared (reflection) needs any valid key."""
    found = guards.get(method)
    if found is not None:
        return found
    service, _, name = method.rpartition("/")
    declared = any(m.startswith(service + "/") for m in guards)
    return Guard(name or "other", "admin" if declared else "any")


def peer_address(peer: str | None) -> str | None:
    """'ipv4:10.0.0.1:5000' / 'ipv6:[::1]:5000' → the address."""
    if not peer:
        return None
    kind, _, rest = peer.partition(":")
    if kind == "ipv4":
        return rest.rsplit(":", 1)[0]
    if kind == "ipv6":
        return rest.rsplit(":", 1)[0].strip("[]").split("%")[0]
    return None


def client_address(peer: str | None, md: Mapping[str, str], front_secret: str | None) -> str | None:
    """The client's address: the connection's peer, or, for a call the HTTP/2 front forwarded
    over the private Unix socket with this process's secret, the address the front saw. The
    front drops these names from what clients send, and a call from anywhere else that carries
    them is taken as from its own peer."""
    if front_secret is not None and peer is not None and peer.startswith("unix:"):
        sent = md.get(FRONT_SECRET)
        if sent is not None and hmac.compare_digest(sent.encode(), front_secret.encode()):
            return md.get(FRONT_PEER) or None
    return peer_address(peer)


class RpcChecks:
    """The pipeline's steps for the calls of one RPC method, built once per method."""

    __slots__ = ("front_secret", "gate", "guard")

    def __init__(self, gate: SecurityGate, guard: Guard, front_secret: str | None = None) -> None:
        self.gate = gate
        self.guard = guard
        self.front_secret = front_secret

    def new_call(self, context: grpc.aio.ServicerContext) -> Call:
        md = {k.lower(): v for k, v in context.invocation_metadata() or () if isinstance(v, str)}
        return self.open(md, client_address(context.peer(), md, self.front_secret))

    def open(self, md: Mapping[str, str], peer: str | None) -> Call:
        """The caller record from the call's (lower-case, text) metadata and the client's address."""
        ctx = current_request()  # the observability interceptor's request id and trace, when it runs
        return open_call("grpc", self.guard, model=None, version=None, peer=peer,
                         forwarded_for=md.get("x-forwarded-for"), authorization=md.get("authorization"),
                         api_key=md.get("x-api-key"),
                         request_id=ctx.request_id if ctx else new_request_id(md.get("x-request-id")),
                         trace_id=ctx.trace_id if ctx else None)

    def check(self, call: Call, request: Any, exchange: Exchange | None) -> Exchange | None:
        """The key's model list, the model's content policy, then its PII rules (the request is
        redacted in place; the exchange, new when needed, restores the answer)."""
        guard, gate = self.guard, self.gate
        model = getattr(request, guard.model or "", None) if guard.body_names_model else None
        if isinstance(model, str) and model:
            gate.check_model(call, model)
            texts = guard.texts
            if texts is not None:
                spec = gate.spec_for(model)
                if spec is not None and spec.pii is not None:
                    exchange = exchange or Exchange(gate.spec_for, texts)
                check_request(call, spec, texts, request, request_size(request),
                              rules=exchange.rules(model) if exchange is not None else None)
        elif guard.every_model:
            gate.check_all_models(call)
        return exchange

    async def admitted(self, context: grpc.aio.ServicerContext, request: Any = None) -> tuple[Call, Exchange | None]:
        """A new call admitted by the gate and, given the RPC's one request message, checked;
        a refusal is audited and aborts the RPC."""
        call = self.new_call(context)
        exchange = None
        try:
            self.gate.admit(call)
            if request is not None:
                exchange = self.check(call, request, None)
        except Exception as exc:
            err = as_error(exc)
            with contextlib.suppress(AuditUnavailableError):  # a refusal goes out even when it cannot be recorded
                await self.gate.record(call, err.http_status, err.code, err.message)
            await grpc_abort(context, err)
        return call, exchange

    async def finish(self, call: Call, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        """Commit the call's audit entry; when it cannot be written the RPC ends UNAVAILABLE (4050)
        instead of answering unrecorded."""
        try:
            await self._finish(call, context, exc)
        except AuditUnavailableError as err:
            await grpc_abort(context, err)

    async def _finish(self, call: Call, context: grpc.aio.ServicerContext, exc: BaseException | None) -> None:
        if call.recorded:
            return
        if exc is None:
            await self.gate.record(call, 200, None)
            return
        if isinstance(exc, InhouseError):
            await self.gate.record(call, exc.http_status, exc.code, exc.message)
            return
        code = context.code() if hasattr(context, "code") else None
        await self.gate.record(call, 200 if code in (None, grpc.StatusCode.OK) else 500, None,
                               None if code is None else f"gRPC status {code}")

    def rules_apply(self, request: Any) -> bool:
        """Whether a call on a server with nothing to admit or audit (``gate.active`` false: no
        keys, audit, allow-list or address rate limit) still has checks to run: the model's own
        content policy and PII rules."""
        guard = self.guard
        if guard.texts is None or not guard.body_names_model:
            return False
        spec = self.gate.spec_for(getattr(request, guard.model or "", None) or None)
        return spec is not None and (spec.policy is not None or spec.pii is not None)


class _Stream:
    """The messages of one client-streaming RPC, checked one by one."""

    __slots__ = ("call", "exchange", "rpc")

    def __init__(self, rpc: RpcChecks, call: Call) -> None:
        self.rpc = rpc
        self.call = call
        self.exchange: Exchange | None = None

    async def checked(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for req in requests:
            try:
                self.exchange = self.rpc.check(self.call, req, self.exchange)
            except InhouseError as exc:
                # audited as its own entry (the stream's was committed when it opened); the
                # stream then ends with the error (4003, 5001)
                blocked = dataclasses.replace(self.call, recorded=False, started=time.perf_counter(), detail={})
                await self.rpc.gate.record(blocked, exc.http_status, exc.code, exc.message)
                raise
            yield req

    def render(self, item: Any) -> None:
        if self.exchange is not None:
            self.exchange.render(item)


class SecurityInterceptor(CachedWrapInterceptor):
    """``front_secret``: the secret of the HTTP/2 front that forwards calls to this server (see
    :func:`client_address`), or None when clients reach it directly."""

    def __init__(self, gate: SecurityGate, guards: Mapping[str, Guard] | None = None, *,
                 front_secret: str | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.front_secret = front_secret
        declared = guards if guards is not None else declared_rpcs()
        self.guards = {m: as_served(g, gate.settings.open_readiness) for m, g in declared.items()}

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        if guard_for(method, self.guards).scope == "open":
            return handler
        return super()._wrap(handler, method)

    def _unary(self, behavior: Unary, method: str, kind: RpcKind) -> Unary:
        rpc = RpcChecks(self.gate, guard_for(method, self.guards), self.front_secret)
        gate = self.gate
        if kind.client_streaming:

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                call, _ = await rpc.admitted(context)
                try:
                    stream = _Stream(rpc, call)
                    result = await behavior(stream.checked(requests), context)
                    stream.render(result)
                except BaseException as exc:
                    await rpc.finish(call, context, exc)
                    raise
                await rpc.finish(call, context, None)
                return result

            return stream_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            if not gate.active and not rpc.rules_apply(request):
                # every check would pass and nothing would be recorded: skip building the call
                result: Any = behavior(request, context)
                return await result if hasattr(result, "__await__") else result
            call, exchange = await rpc.admitted(context, request)
            try:
                result = behavior(request, context)
                if hasattr(result, "__await__"):
                    result = await result
                if exchange is not None:
                    exchange.render(result)
            except BaseException as exc:
                await rpc.finish(call, context, exc)
                raise
            await rpc.finish(call, context, None)
            return result

        return unary_unary

    def _streaming(self, behavior: Streaming, method: str, kind: RpcKind) -> Streaming:
        rpc = RpcChecks(self.gate, guard_for(method, self.guards), self.front_secret)
        if kind.client_streaming:

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                call, _ = await rpc.admitted(context)
                await rpc.finish(call, context, None)
                stream = _Stream(rpc, call)
                try:
                    async for item in behavior(stream.checked(requests), context):
                        stream.render(item)
                        yield item
                except InhouseError as exc:
                    await grpc_abort(context, exc)

            return stream_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            call, exchange = await rpc.admitted(context, request)
            await rpc.finish(call, context, None)  # committed before the first response message
            async for item in behavior(request, context):
                if exchange is not None:
                    exchange.render(item)
                yield item

        return unary_stream
