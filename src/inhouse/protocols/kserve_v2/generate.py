"""Chat and generation models streaming over KServe v2 gRPC ``ModelStreamInfer``, in Triton's
decoupled-model convention (as its vLLM / TensorRT-LLM backends): one request in, one response
per generated piece of text out, the last one marked ``triton_final_response``.

Request: BYTES input ``text_input`` (a raw prompt) or ``messages`` (a JSON array of chat
messages, rendered with the model's chat template), optionally with ``tools`` (a JSON array of
OpenAI-form tools, for ``messages``); parameters ``max_tokens`` (default 256), ``temperature``,
``top_p``, ``top_k``, ``seed``, ``stop`` (a string, or a JSON array of strings), ``ignore_eos``,
``tool_choice`` (``auto``, ``none``, ``required`` or a function name). Responses: BYTES output
``text_output`` (the new text; ``reasoning_output`` for thinking split off by a reasoning
parser), parameter ``triton_final_response``; tool calls the model made come in one response
with BYTES output ``tool_calls`` (a JSON array of OpenAI-form calls) before the final one, which
also carries ``finish_reason``, ``prompt_tokens``, ``completion_tokens`` and ``cached_tokens``.

The same pieces serve the REST generate extension (``generate_rest.py``): :class:`Generation`
is what a request asks for, whatever its wire format, and :func:`generation_pieces` turns it into
:class:`Piece` objects each transport renders."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from inhouse.core.types import InferRequest, InferResponse, OutputTensor
from inhouse.errors import InvalidRequestError
from inhouse.llm.chat import normalize_messages, normalize_tools
from inhouse.llm.events import ChoiceEnd, Event, ReasoningDelta, TextDelta, ToolCall, ToolCallArgs, ToolCallStart, Usage
from inhouse.llm.requests import ChatRequest, CompletionRequest
from inhouse.llm.service import LLMService
from inhouse.llm.types import SamplingParams
from inhouse.protocols.errors import as_inhouse_error
from inhouse.protocols.kserve_v2.grpc_wire import parse_infer_request, render_infer_response
from inhouse.protocols.proto import grpc_service_pb2 as pb

INPUTS = ("text_input", "messages")
DEFAULT_MAX_TOKENS = 256


def is_generation_request(llm: LLMService, msg: Any) -> bool:
    return any(t.name in INPUTS for t in msg.inputs) and llm.is_generative(msg.model_name)


def _text(req: InferRequest, name: str) -> str | None:
    for t in req.inputs:
        if t.name == name:
            if t.datatype != "BYTES" or t.data.size != 1:
                raise InvalidRequestError(f"Input '{name}' must be BYTES with one element.")
            value = t.data.ravel()[0]
            return value.decode("utf-8") if isinstance(value, bytes) else str(value)
    return None


def _tools(req: InferRequest) -> list[dict[str, Any]] | None:
    text = _text(req, "tools")
    if text is None:
        return None
    try:
        tools = json.loads(text)
    except ValueError:
        raise InvalidRequestError("Input 'tools' must be a JSON array of tools.") from None
    return normalize_tools(tools)


def _tool_choice(parameters: dict[str, Any], tools: list[dict[str, Any]] | None) -> str:
    choice = parameters.get("tool_choice", "auto")
    if not isinstance(choice, str) or not choice:
        raise InvalidRequestError("Parameter 'tool_choice' must be 'auto', 'none', 'required' or a function name.")
    if choice != "auto" and choice != "none" and not tools:
        raise InvalidRequestError("Parameter 'tool_choice' needs input 'tools' to choose from.")
    return choice


def _sampling(p: dict[str, Any]) -> SamplingParams:
    stop = p.get("stop")
    stops: list[str] = []
    if isinstance(stop, list):  # REST sends JSON, so a list arrives as one
        stops = [str(s) for s in stop]
    elif isinstance(stop, str) and stop:
        try:
            parsed = json.loads(stop)
            stops = [str(s) for s in parsed] if isinstance(parsed, list) else [stop]
        except ValueError:
            stops = [stop]
    try:
        return SamplingParams(
            max_tokens=int(p.get("max_tokens", DEFAULT_MAX_TOKENS)),
            temperature=float(p.get("temperature", 1.0)), top_p=float(p.get("top_p", 1.0)),
            top_k=int(p.get("top_k", 0)), seed=int(p["seed"]) if p.get("seed") is not None else None,
            stop=stops, ignore_eos=bool(p.get("ignore_eos", False)))
    except (TypeError, ValueError) as err:
        raise InvalidRequestError(f"A generation parameter has the wrong type: {err}.") from None


def _response(req: InferRequest, name: str, text: str, params: dict[str, Any]) -> Any:
    out = OutputTensor(name=name, datatype="BYTES", shape=[1], data=np.array([text.encode("utf-8")], dtype=object))
    resp = InferResponse(model=req.model, version=req.version or 0, outputs=[out], id=req.id, parameters=params)
    msg = render_infer_response(resp, req)
    if req.version is None:
        msg.model_version = ""
    return pb.ModelStreamInferResponse(infer_response=msg)


def stream_error(msg: Any, exc: BaseException) -> Any:
    """The in-band answer of a ModelStreamInfer request that failed: the stream goes on, so the
    error is a response (``[code] message``) naming the request it answers, not a status."""
    return pb.ModelStreamInferResponse(
        error_message=str(as_inhouse_error(exc)),
        infer_response=pb.ModelInferResponse(model_name=msg.model_name, model_version=msg.model_version, id=msg.id))


@dataclass(slots=True)
class Generation:
    """One generation request, as any transport carries it: a raw prompt or chat messages (a
    JSON array), tools (OpenAI form) for chat, and the sampling parameters by name."""

    model: str
    prompt: str | None = None
    messages: str | list[Any] | None = None
    tools: list[dict[str, Any]] | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    timeout_s: float | None = None
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Piece:
    """One answer of a generation: a piece of ``output`` (text_output, reasoning_output, or
    tool_calls as a JSON array); the final one carries ``parameters`` (finish_reason, token counts)."""

    output: str
    text: str
    final: bool = False
    parameters: dict[str, Any] = field(default_factory=dict)


def generation_of(req: InferRequest) -> Generation:
    """The generation a v2 infer request (BYTES inputs ``text_input`` / ``messages`` / ``tools``) asks for."""
    return Generation(model=req.model, prompt=_text(req, "text_input"), messages=_text(req, "messages"),
                      tools=_tools(req), parameters=req.parameters, timeout_s=req.timeout_s,
                      priority=req.priority or 0)


def _events(llm: LLMService, g: Generation) -> AsyncIterator[Event]:
    sampling = _sampling(g.parameters)
    if g.messages is not None:
        chat = g.messages
        if isinstance(chat, str):
            try:
                chat = json.loads(chat)
            except ValueError:
                raise InvalidRequestError("Input 'messages' must be a JSON array of chat messages.") from None
        tool_choice = _tool_choice(g.parameters, g.tools)
        return llm.chat(ChatRequest(model=g.model, messages=normalize_messages(chat, g.model), sampling=sampling,
                                    tools=g.tools, tool_choice=tool_choice, timeout_s=g.timeout_s,
                                    priority=g.priority))
    if g.tools is not None:
        raise InvalidRequestError("Input 'tools' needs 'messages' (a chat request), not 'text_input'.")
    return llm.complete(CompletionRequest(model=g.model, prompts=[g.prompt or ""], sampling=sampling,
                                          timeout_s=g.timeout_s, priority=g.priority))


async def generation_pieces(llm: LLMService, g: Generation) -> AsyncIterator[Piece]:
    """The pieces of one generation, the last one final. Request errors (unknown model, context
    too long, overload) raise before the first piece."""
    end: ChoiceEnd | None = None
    calls: list[ToolCall] = []
    async for ev in _events(llm, g):
        if isinstance(ev, TextDelta) and ev.text:
            yield Piece("text_output", ev.text)
        elif isinstance(ev, ReasoningDelta):
            yield Piece("reasoning_output", ev.text)
        elif isinstance(ev, ToolCallStart):
            calls.append(ToolCall(ev.id, ev.name, ""))
        elif isinstance(ev, ToolCallArgs):
            calls[ev.call].arguments += ev.fragment
        elif isinstance(ev, ChoiceEnd):
            end = ev
            if calls:
                yield Piece("tool_calls", json.dumps([
                    {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                    for c in calls]))
        elif isinstance(ev, Usage):
            yield Piece("text_output", "", final=True, parameters={
                "finish_reason": end.finish_reason if end else "stop", "prompt_tokens": ev.prompt_tokens,
                "completion_tokens": ev.completion_tokens, "cached_tokens": ev.cached_tokens})


async def generation_stream(llm: LLMService, msg: Any, timeout_s: float | None) -> AsyncIterator[tuple[Any, bool]]:
    """(response, is_final) pairs; a failure becomes a final response with ``error_message``."""
    try:
        req = parse_infer_request(msg, timeout_s)
        async for p in generation_pieces(llm, generation_of(req)):
            yield _response(req, p.output, p.text, {"triton_final_response": p.final, **p.parameters}), p.final
    except Exception as exc:
        yield stream_error(msg, exc), True
