"""The one security pipeline every transport runs: admit the caller, inspect the request's
texts, record the audit entry, rewrite the answer's texts (whole, or in streamed pieces).

It knows no URL, RPC name or wire format. Each route or RPC declares a :class:`Guard` (its
scope, where its model name is, and its protocol's :class:`Texts` visitor); the HTTP middleware,
the v2 infer entry and the gRPC interceptor are thin adapters that find the declaration, fill a
:class:`~inhouse.security.gate.Call` and call the functions here."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from inhouse.core.spec import ModelSpec
from inhouse.errors import InvalidRequestError, PolicyBlockedError
from inhouse.security.gate import Call, Scope, SecurityGate
from inhouse.security.pii import PieceTexts, PiiRules, Vault, redact
from inhouse.security.policy import check_policy

TextFn = Callable[[str], str]
Visitor = Callable[[Any, TextFn], None]
"""Calls ``fn`` on every text of a parsed request (a JSON document, a protobuf message) and
stores what it returns in place."""
StreamVisitor = Callable[[Any, PieceTexts], list[Any]]
"""One streamed event's texts rewritten through ``pieces``; the events to send instead (a
protocol may need an extra one to flush text held back at the end of a block)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class Texts:
    """Where a protocol's requests keep the texts that content policies and PII rules read,
    supplied by the protocol adapter."""

    request: Visitor
    tools: Callable[[Any], list[str] | None] | None = None  # the tool names a request offers
    skip: Callable[[bytes], bool] | None = None  # a raw body that certainly holds no text: not parsed
    stream: StreamVisitor | None = None  # the texts of one event of a streamed answer
    answer: Callable[[Any, Exchange], None] | None = None  # an answer message's texts, in place (gRPC)


@dataclass(frozen=True, slots=True)
class Guard:
    """What the security layer needs of one route or RPC. ``model``: where its model name is,
    ``"path"`` (the route's ``{model}`` and ``{version}``) or the name of the request field that
    holds it (OpenAI's ``model``, gRPC's ``model_name``). ``every_model``: without a model named,
    the call is about every model (statistics), so a key limited to some may not make it."""

    action: str
    scope: Scope
    model: str | None = None
    texts: Texts | None = None
    every_model: bool = False

    @property
    def body_names_model(self) -> bool:
        return self.model is not None and self.model != "path"


UNDECLARED = Guard("other", "admin")
"""A route nobody declared: only admins (fail closed)."""

READINESS = Guard("health", "readiness")
"""Readiness checks (a bare ready or not): open like liveness, so a load balancer or a
Kubernetes probe needs no key, unless the server sets ``open_readiness: false``."""


def as_served(guard: Guard, open_readiness: bool) -> Guard:
    """A declared guard as this server enforces it: readiness open, or behind the metrics scope.
    The transports apply it once per route or method; an unresolved ``readiness`` scope is on no
    key, so it fails closed."""
    if guard.scope != "readiness":
        return guard
    return dataclasses.replace(guard, scope="open" if open_readiness else "metrics")

GUARD_ATTR = "inhouse_guard"


def guarded(guard: Guard) -> Callable[[F], F]:
    """Declares an endpoint's :class:`Guard` (read back by :func:`guard_of`)."""
    def mark(fn: F) -> F:
        setattr(fn, GUARD_ATTR, guard)
        return fn
    return mark


def guard_of(endpoint: Any) -> Guard | None:
    """The guard an endpoint declared (a bound method reads its function's)."""
    found = getattr(endpoint, GUARD_ATTR, None)
    return found if isinstance(found, Guard) else None


def credential(authorization: str | None, api_key: str | None) -> str | None:
    """The API key a request presents: ``Authorization: Bearer KEY``, else ``x-api-key``
    (headers on HTTP, metadata on gRPC)."""
    if authorization:
        kind, _, value = authorization.partition(" ")
        return value.strip() if kind.lower() == "bearer" else None
    return api_key


def open_call(transport: str, guard: Guard, *, model: str | None, version: str | None, peer: str | None,
              forwarded_for: str | None, authorization: str | None, api_key: str | None, request_id: str,
              trace_id: str | None) -> Call:
    """The caller record of one request, whatever carried it (the one place a ``Call`` is made
    and the credential read)."""
    return Call(transport=transport, action=guard.action, scope=guard.scope, model=model, version=version, peer=peer,
                forwarded_for=forwarded_for, credential=credential(authorization, api_key), request_id=request_id,
                trace_id=trace_id)


# ---- request texts --------------------------------------------------------------------------
def rules_apply(gate: SecurityGate, guard: Guard, model: str | None) -> tuple[bool, ModelSpec | None]:
    """Whether the request's texts must be read (the body names the model, payloads are
    audited, or the model has a content policy or PII rules), and the model's spec when known."""
    if guard.body_names_model:  # read even without texts: the key's model list is checked against it
        return True, None
    if guard.texts is None:
        return False, None
    spec = gate.spec_for(model)
    return gate.settings.audit_payloads or (
        spec is not None and (spec.policy is not None or spec.pii is not None)), spec


def body_model(gate: SecurityGate, call: Call, guard: Guard, doc: Any) -> ModelSpec | None:
    """The model a request names in its body, checked against the caller's key; its spec."""
    model = doc.get(guard.model) if isinstance(doc, dict) and guard.model else None
    if not isinstance(model, str):
        raise InvalidRequestError(f"The request needs a '{guard.model}' field naming the model to use.")
    gate.check_model(call, model)
    return gate.spec_for(model)


def check_request(call: Call, spec: ModelSpec | None, texts: Texts, doc: Any, size: int, *, binary: bool = False,
                  rules: PiiRules | None = None) -> PiiRules | None:
    """The model's content policy (5001) and input redaction on one parsed request ``doc``
    (None: not parsed, it holds no text). Redacts ``doc`` in place and returns the PII rules
    that did (pass ``rules`` to share a vault, as a gRPC stream does), or None when the model
    redacts no inputs."""
    if spec is None:
        return None
    policy, pii = spec.policy, spec.pii
    if binary and ((policy is not None and policy.deny_patterns) or (pii is not None and pii.inputs)):
        raise PolicyBlockedError(f"Model '{spec.name}' has text rules (content policy or PII redaction) that "
                                 "need JSON tensor data; do not use the binary tensor data extension for it.")
    if policy is not None:
        found: list[str] = []
        if doc is not None and policy.deny_patterns:

            def collect(s: str) -> str:
                found.append(s)
                return s

            texts.request(doc, collect)
        check_policy(policy, spec.name, size=size, texts=found,
                     tools=texts.tools(doc) if texts.tools is not None and doc is not None else None)
    if pii is None or not pii.inputs or doc is None:
        return None
    rules = rules if rules is not None else PiiRules(pii)
    redact_request(call, texts, doc, rules)
    return rules


def redact_request(call: Call, texts: Texts, doc: Any, rules: PiiRules) -> None:
    """Numbered placeholders for the PII in a request's texts, in place."""
    if not rules.spec.inputs:
        return
    before = len(rules.vault.originals)
    texts.request(doc, rules.redact_input)
    if len(rules.vault.originals) > before:
        call.detail["pii_redacted"] = len(rules.vault.originals)


def output_rules(spec: ModelSpec | None, redacted: PiiRules | None) -> TextFn | None:
    """What rewrites the answer's texts: the originals restored (when the request was
    redacted) or PII masked; None when the answer passes unchanged."""
    pii = spec.pii if spec is not None else None
    if pii is None:
        return None
    if pii.outputs == "restore":
        return redacted.output if redacted is not None else None
    if pii.outputs == "redact":
        return (redacted or PiiRules(pii)).output
    return None


def audit_payload(gate: SecurityGate, call: Call, body: bytes) -> None:
    if gate.settings.audit_payloads:
        call.detail["request"] = redact(body[:4096].decode("utf-8", "replace"))


class Exchange:
    """The PII state of one call or stream: its requests share one vault, so an answer is
    restored whichever request it belongs to (up to the last ``STREAM_VAULT_LIMIT`` values, so a
    long-lived stream's memory stays bounded); each model's rules, and the answer pieces held
    back per model (see :class:`~inhouse.security.pii.PieceTexts`)."""

    STREAM_VAULT_LIMIT = 4096

    def __init__(self, spec_for: Callable[[str], ModelSpec | None], texts: Texts) -> None:
        self._spec_for = spec_for
        self.texts = texts
        self.vault = Vault(limit=self.STREAM_VAULT_LIMIT)
        self._rules: dict[str, PiiRules | None] = {}
        self._pieces: dict[str, PieceTexts] = {}

    def rules(self, model: str) -> PiiRules | None:
        if model not in self._rules:
            spec = self._spec_for(model)
            pii = spec.pii if spec is not None else None
            self._rules[model] = PiiRules(pii, self.vault) if pii is not None else None
        return self._rules[model]

    def pieces(self, model: str, rules: PiiRules) -> PieceTexts:
        found = self._pieces.get(model)
        if found is None:
            found = self._pieces[model] = PieceTexts(rules.output)
        return found

    def held(self, model: str) -> PieceTexts | None:
        return self._pieces.get(model)

    def redact_request(self, call: Call, request: Any, model: str) -> None:
        rules = self.rules(model)
        if rules is not None:
            redact_request(call, self.texts, request, rules)

    def render(self, answer: Any) -> None:
        """An answer message's texts restored or masked, in place, by the protocol's visitor."""
        if self.texts.answer is not None:
            self.texts.answer(answer, self)


# ---- answer texts ---------------------------------------------------------------------------
_NOT_TEXT_KEYS = frozenset({"id", "model", "object", "role", "type", "finish_reason", "stop_reason", "name",
                            "datatype", "model_name", "model_version", "system_fingerprint", "tool_call_id"})


def map_all_texts(value: Any, fn: TextFn) -> Any:
    """Every string value of an answer document except identifiers and enum-like fields."""
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, list):
        return [map_all_texts(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: v if k in _NOT_TEXT_KEYS else map_all_texts(v, fn) for k, v in value.items()}
    return value


def transform_json_body(body: bytes, fn: TextFn) -> bytes:
    """A JSON answer with its texts rewritten (PII restored or redacted); any other body unchanged."""
    with contextlib.suppress(orjson.JSONDecodeError):
        return orjson.dumps(map_all_texts(orjson.loads(body), fn))
    return body


def whole_event(doc: Any, pieces: PieceTexts) -> list[Any]:
    """A streamed event whose texts are rewritten as they are (no text split across events)."""
    return [map_all_texts(doc, pieces.fn)]


class AnswerStream:
    """The state of one streamed answer whose texts are rewritten: the bytes of an event not yet
    complete, and the protocol's event visitor with the pieces it holds back. A framing says
    what ends an event (``SEPARATOR``) and how a run of whole events is rewritten."""

    __slots__ = ("_pending", "_visit", "pieces")
    SEPARATOR = b"\n"

    def __init__(self, fn: TextFn, visit: StreamVisitor | None) -> None:
        self.pieces = PieceTexts(fn)
        self._visit = visit or whole_event
        self._pending = b""

    def feed(self, data: bytes, more: bool) -> bytes:
        """The complete events so far, rewritten; a partial one waits for the rest."""
        sep = self.SEPARATOR
        buf = self._pending + data
        events, _, rest = buf.rpartition(sep) if more else (buf, b"", b"")
        self._pending = rest
        return self.transform(events + (sep if more and events else b""))

    def transform(self, data: bytes) -> bytes:
        raise NotImplementedError


class SseStream(AnswerStream):
    """Server-sent events: an event ends at a blank line; its ``data:`` lines carry JSON."""

    __slots__ = ()
    SEPARATOR = b"\n\n"

    def transform(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for block in data.split(b"\n\n"):
            lines = block.split(b"\n")
            docs: list[Any] | None = None
            for i, line in enumerate(lines):
                payload = line[5:].strip() if line.startswith(b"data:") else b""
                if payload and payload != b"[DONE]":
                    with contextlib.suppress(orjson.JSONDecodeError):
                        docs = self._visit(orjson.loads(payload), self.pieces)
                        lines[i] = b"data: " + orjson.dumps(docs[-1])
            if docs and len(docs) > 1:
                out.extend(b"event: " + str(d.get("type", "message")).encode() + b"\ndata: " + orjson.dumps(d)
                           if isinstance(d, dict) else b"data: " + orjson.dumps(d) for d in docs[:-1])
            out.append(b"\n".join(lines))
        return b"\n\n".join(out)


class NdjsonStream(AnswerStream):
    """Newline-delimited JSON: one event per line."""

    __slots__ = ()
    SEPARATOR = b"\n"

    def transform(self, data: bytes) -> bytes:
        out: list[bytes] = []
        for line in data.split(b"\n"):
            if not line.strip():
                out.append(line)
                continue
            try:
                docs = self._visit(orjson.loads(line), self.pieces)
            except orjson.JSONDecodeError:
                out.append(line)
                continue
            out.extend(orjson.dumps(d) for d in docs)
        return b"\n".join(out)


_STREAM_FRAMINGS: dict[bytes, type[AnswerStream]] = {b"text/event-stream": SseStream,
                                                      b"application/x-ndjson": NdjsonStream}


def stream_framing(content_type: bytes) -> type[AnswerStream] | None:
    """How a streamed answer of this media type splits into events (server-sent events or one
    JSON document per line); None for an answer that is not a stream of events."""
    return _STREAM_FRAMINGS.get(content_type.split(b";", 1)[0].strip().lower())
