"""HTTP plumbing shared by the OpenAI and Anthropic adapters: JSON bodies validated into
pydantic models (unknown fields accepted and logged), server-sent events, and cancelling the
generation when the client goes away."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ConfigDict, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from inhouse.core.json_doc import json_object
from inhouse.errors import InvalidRequestError
from inhouse.protocols.http_body import read_body

log = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")



class LenientModel(BaseModel):
    """A request body: unknown fields are kept (and logged by parse_json_model), not rejected,
    so newer clients keep working."""

    model_config = ConfigDict(extra="allow")


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no", "Connection": "keep-alive"}


async def parse_json_model(request: Request, model: type[M], limit: int) -> M:
    body = await read_body(request, limit)
    doc = json_object(body)
    try:
        parsed = model.model_validate(doc)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(p) for p in first["loc"])
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in err.errors()[:5])
        raise InvalidRequestError(f"Invalid request: {problems}.", details={"param": param or None}) from None
    extra = sorted((parsed.model_extra or {}).keys())
    if extra:
        log.info("request fields accepted but ignored", extra={"path": request.url.path, "fields": extra})
    return parsed


def json_response(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status_code=status, media_type="application/json", headers=headers)


def sse_data(doc: Any) -> bytes:
    return b"data: " + orjson.dumps(doc) + b"\n\n"


def sse_event(name: str, doc: Any) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(doc) + b"\n\n"


def sse_response(body: AsyncIterator[bytes]) -> StreamingResponse:
    """Starlette cancels ``body`` when the client disconnects, which closes the generation."""
    return StreamingResponse(body, media_type="text/event-stream", headers=SSE_HEADERS)


async def until_disconnected(request: Request, work: Awaitable[T], poll_s: float = 0.2) -> T:
    """Await ``work`` but cancel it (and so abort the generation) if the client hangs up."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=poll_s)
            if done:
                return task.result()
            if await request.is_disconnected():
                task.cancel()
                raise asyncio.CancelledError("client disconnected")
    finally:
        if not task.done():
            task.cancel()


async def first_and_rest(gen: AsyncIterator[T], request: Request, poll_s: float = 0.2) -> tuple[T, AsyncIterator[T]]:
    """The first item (so errors before any output become a proper HTTP status) and an
    iterator over all items, the first included. A client that hangs up before the first item
    cancels the generation: an engine that counts the prompt itself (llama.cpp, vLLM) gives
    nothing until its slot is free and the prompt is read, which can take seconds."""
    first = await until_disconnected(request, gen.__anext__(), poll_s)

    async def rest() -> AsyncIterator[T]:
        try:
            yield first
            async for item in gen:
                yield item
        finally:
            aclose = getattr(gen, "aclose", None)
            if aclose is not None:
                await aclose()

    return first, rest()

