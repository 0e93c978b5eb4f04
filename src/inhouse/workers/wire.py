"""What crosses the private socket between a worker that holds a model (``placement: one``) and
the stand-ins of the other workers: length-prefixed JSON frames, tensors and generation
requests / chunks as plain documents. One connection carries one call, so closing it is how a
stand-in cancels a generation."""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from inhouse.llm.types import GenerationChunk, GenerationRequest, SamplingParams, TokenLogprob

_HEADER = struct.Struct(">I")
MAX_FRAME = 256 << 20


def owner_path(folder: Path | str, index: int) -> str:
    """The socket on which worker ``index`` answers for the models it holds."""
    return str(Path(folder) / f"models-{index}.sock")


def _default(obj: Any) -> Any:
    if isinstance(obj, bytes):
        return base64.b64encode(obj).decode()
    raise TypeError(f"{type(obj).__name__} does not cross the worker socket")


def frame(doc: Any) -> bytes:
    body = orjson.dumps(doc, default=_default, option=orjson.OPT_SERIALIZE_NUMPY)
    return _HEADER.pack(len(body)) + body


async def read_frame(reader: asyncio.StreamReader) -> Any:
    (size,) = _HEADER.unpack(await reader.readexactly(4))
    if size > MAX_FRAME:
        raise ValueError(f"a frame of {size} bytes is over the limit")
    return orjson.loads(await reader.readexactly(size))


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    parts, left = [], n
    while left:
        part = sock.recv(left)
        if not part:
            raise ConnectionError("the worker holding the model closed the connection")
        parts.append(part)
        left -= len(part)
    return b"".join(parts)


def call_blocking(path: str, doc: dict[str, Any], timeout_s: float = 600.0) -> Any:
    """One call from a thread (tokenizer calls, load-time questions): connect, send, one answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        sock.connect(path)
        sock.sendall(frame(doc))
        (size,) = _HEADER.unpack(_recv_exactly(sock, 4))
        return orjson.loads(_recv_exactly(sock, size))


# ---- tensors ----------------------------------------------------------------------------------
def pack_tensors(arrays: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, arr in arrays.items():
        a = np.asarray(arr)
        if a.dtype == object or a.dtype.kind in ("S", "U"):
            items = [x if isinstance(x, bytes) else str(x).encode() for x in a.ravel()]
            out[name] = {"dtype": "object", "shape": list(a.shape), "items": items}
        else:
            out[name] = {"dtype": a.dtype.str, "shape": list(a.shape),
                         "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
    return out


def unpack_tensors(doc: dict[str, Any]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for name, t in doc.items():
        shape = tuple(int(d) for d in t["shape"])
        if t["dtype"] == "object":
            items = [base64.b64decode(x) for x in t["items"]]
            arr = np.empty(len(items), dtype=object)
            arr[:] = items
            out[name] = arr.reshape(shape)
        else:
            out[name] = np.frombuffer(base64.b64decode(t["data"]), dtype=np.dtype(t["dtype"])).reshape(shape)
    return out


# ---- generation -------------------------------------------------------------------------------
def pack_request(req: GenerationRequest, remaining_s: float | None, schema: dict[str, Any] | None) -> dict[str, Any]:
    """The constraint is an object of this process: what crosses is the schema to rebuild it from."""
    s = req.sampling
    return {"request_id": req.request_id, "prompt": req.prompt_token_ids, "remaining_s": remaining_s,
            "priority": req.priority, "images": req.images, "schema": schema, "text": req.prompt_text,
            "sampling": {"max_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                         "top_k": s.top_k, "seed": s.seed, "stop": s.stop, "stop_token_ids": s.stop_token_ids,
                         "ignore_eos": s.ignore_eos, "frequency_penalty": s.frequency_penalty,
                         "presence_penalty": s.presence_penalty, "repetition_penalty": s.repetition_penalty,
                         "logprobs": s.logprobs}}


def unpack_request(doc: dict[str, Any], deadline: float | None) -> GenerationRequest:
    return GenerationRequest(str(doc["request_id"]), [int(t) for t in doc["prompt"]],
                             SamplingParams(**doc["sampling"]), None, deadline, int(doc.get("priority") or 0),
                             images=[base64.b64decode(x) for x in doc.get("images") or ()],
                             prompt_text=doc.get("text"))


def pack_chunk(c: GenerationChunk) -> dict[str, Any]:
    doc: dict[str, Any] = {"ids": c.token_ids, "text": c.text, "finish": c.finish_reason, "p": c.prompt_tokens,
                           "n": c.completion_tokens, "cached": c.cached_tokens, "stop": c.stop_string}
    if c.logprobs is not None:
        doc["logprobs"] = [[lp.token_id, lp.token, lp.logprob, lp.top] for lp in c.logprobs]
    return doc


def unpack_chunk(doc: dict[str, Any]) -> GenerationChunk:
    logprobs = None
    if doc.get("logprobs") is not None:
        logprobs = [TokenLogprob(int(i), str(t), float(lp), [(int(a), str(b), float(c)) for a, b, c in top])
                    for i, t, lp, top in doc["logprobs"]]
    return GenerationChunk(doc["ids"], doc["text"], doc["finish"], doc["p"], doc["n"], doc.get("cached") or 0,
                           logprobs, doc.get("stop"))
