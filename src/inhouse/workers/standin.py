"""Where a model held by one worker (``placement: one``) is loaded in every other worker: a light
stand-in that looks like the loaded model to this worker (its tensors, an ``engine`` with a
tokenizer, an ``embedder``, a scheduler) and makes each engine-level call in the worker that
holds it, over that worker's private socket (``owner.ModelHost``). So the security pipeline,
keys, audit, rate limits, metrics and tool parsing run once, here, exactly as for a model loaded
here; only token generation, tokenization and the model's compute happen in the owner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import AsyncGenerator, Sequence
from typing import Any

import numpy as np

from inhouse.backends import LoadContext
from inhouse.backends.relay import SchemaConstraint
from inhouse.core.spec import ModelSpec, TensorSpec
from inhouse.errors import InhouseError, ModelLoadError, ModelNotReadyError
from inhouse.llm.types import GenerationChunk, GenerationRequest
from inhouse.workers.control import rebuild_error
from inhouse.workers.wire import (
    call_blocking,
    frame,
    pack_request,
    pack_tensors,
    read_frame,
    unpack_chunk,
    unpack_tensors,
)

log = logging.getLogger(__name__)

POLL_S = 0.2  # how often a stand-in being loaded asks the owner how its load goes
UNREACHABLE_S = 120.0  # an owner that cannot be reached this long fails the stand-in's load
RETRY_AFTER = "2"


class _Owner:
    """The worker that holds one model version, as its stand-ins reach it; ``down`` says why it
    cannot answer now (it exited and the supervisor is restarting it), or None."""

    def __init__(self, path: str, index: int, name: str, version: int) -> None:
        self.path = path
        self.index = index
        self.name = name
        self.version = version
        self.down: str | None = None

    def unavailable(self) -> ModelNotReadyError:
        return ModelNotReadyError(
            f"Model '{self.name}' is held by worker {self.index}, which is not running (the server restarts "
            "it and loads the model again); retry shortly.", headers={"Retry-After": RETRY_AFTER})

    def call(self, op: str, **args: Any) -> Any:
        """Blocking (a loader or request thread)."""
        if self.down is not None:
            raise self.unavailable()
        try:
            answer = call_blocking(self.path, {"op": op, "args": {"name": self.name, "version": self.version,
                                                                 **args}})
        except (OSError, ValueError):
            raise self.unavailable() from None
        if "error" in answer:
            raise rebuild_error(answer["error"])
        return answer["ok"]

    async def acall(self, op: str, **args: Any) -> Any:
        reader, writer = await self._open()
        try:
            writer.write(frame({"op": op, "args": {"name": self.name, "version": self.version, **args}}))
            answer = await read_frame(reader)
        except (asyncio.IncompleteReadError, OSError, ValueError):
            raise self.unavailable() from None
        finally:
            writer.close()
        if "error" in answer:
            raise rebuild_error(answer["error"])
        return answer["ok"]

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.down is not None:
            raise self.unavailable()
        try:
            return await asyncio.open_unix_connection(self.path)
        except OSError:
            raise self.unavailable() from None

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        remaining = None if request.deadline is None else max(0.0, request.deadline - time.monotonic())
        schema = request.constraint.schema if isinstance(request.constraint, SchemaConstraint) else None
        reader, writer = await self._open()
        try:
            writer.write(frame({"op": "generate", "args": {
                "name": self.name, "version": self.version, "request": pack_request(request, remaining, schema)}}))
            while True:
                try:
                    doc = await read_frame(reader)
                except (asyncio.IncompleteReadError, OSError, ValueError):
                    raise self.unavailable() from None
                if "chunk" in doc:
                    yield unpack_chunk(doc["chunk"])
                elif "error" in doc:
                    raise rebuild_error(doc["error"])
                else:
                    return
        finally:
            writer.close()  # before the end of the stream: the owner cancels the sequence and frees its slot


class RemoteTokenizer:
    """The tokenizer calls the LLM service makes, answered by the owner. Blocking, like
    llama.cpp's ``ServerTokenizer``: the service calls it off the event loop."""

    def __init__(self, owner: _Owner, vocab: int, chat_template: str | None) -> None:
        self._owner = owner
        self._vocab = vocab
        self.chat_template = chat_template

    def __len__(self) -> int:
        return self._vocab

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [int(t) for t in self._owner.call("encode", text=text, add_special=add_special_tokens)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return str(self._owner.call("decode", ids=[int(i) for i in ids], skip=skip_special_tokens))


class RemoteEngine:
    """An ``LLMEngine`` whose sequences run in the owner. Constraints cross as their JSON schema
    (``schema_constraint``), which the owner compiles for its own tokenizer."""

    def __init__(self, owner: _Owner, info: dict[str, Any]) -> None:
        self._owner = owner
        self.max_model_len = int(info["max_model_len"])
        self.tokenizer = RemoteTokenizer(owner, int(info["vocab"]), info.get("chat_template"))
        self.accepts_images = bool(info.get("accepts_images"))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                            *, add_generation_prompt: bool = True, **template_kwargs: Any) -> list[int]:
        # the images travel with the generation request; the text keeps the marker of where each goes
        plain = [{k: v for k, v in m.items() if k != "images"} for m in messages]
        ids = self._owner.call("template", messages=plain, tools=list(tools) if tools else None,
                               add_generation_prompt=add_generation_prompt, kwargs=template_kwargs)
        return [int(t) for t in ids]

    def schema_constraint(self, schema: dict[str, Any]) -> SchemaConstraint:
        return SchemaConstraint(schema)

    def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        return self._owner.stream(request)


class RemoteTextEngine(RemoteEngine):
    """The stand-in of an engine that tokenizes prompt text itself (llama-server): chats are
    rendered by the owner's engine and sent to it as text, as a local client's are."""

    async def render_chat(self, messages: Sequence[dict[str, Any]], tools: Sequence[dict[str, Any]] | None = None,
                          *, add_generation_prompt: bool = True, **template_kwargs: Any) -> str:
        plain = [{k: v for k, v in m.items() if k != "images"} for m in messages]
        return str(await self._owner.acall("render", messages=plain, tools=list(tools) if tools else None,
                                           add_generation_prompt=add_generation_prompt, kwargs=template_kwargs))


class RemoteEmbedder:
    def __init__(self, owner: _Owner, info: dict[str, Any]) -> None:
        self._owner = owner
        self.max_model_len = int(info["max_model_len"])
        self.tokenizer = RemoteTokenizer(owner, int(info["vocab"]), info.get("chat_template"))

    async def embed(self, texts: Sequence[str] | Sequence[Sequence[int]]) -> tuple[np.ndarray, int]:
        doc = await self._owner.acall("embed", inputs=[t if isinstance(t, str) else list(t) for t in texts])
        return unpack_tensors(doc["vectors"])["v"], int(doc["tokens"])


class RemoteScheduler:
    """The request path of v2 infer: the owner's scheduler batches what every worker sends."""

    def __init__(self, owner: _Owner) -> None:
        self._owner = owner
        self._inflight = 0

    async def submit(self, inputs: dict[str, np.ndarray], outputs: list[str] | None, *,
                     priority: int | None = None, timeout_s: float | None = None) -> dict[str, np.ndarray]:
        self._inflight += 1
        try:
            doc = await self._owner.acall("submit", inputs=pack_tensors(inputs), outputs=outputs, priority=priority,
                                          timeout_s=timeout_s)
            return unpack_tensors(doc)
        finally:
            self._inflight -= 1

    def queue_depth(self) -> int:
        return self._inflight

    async def close(self) -> None:
        return None


class StandInModel:
    """What this worker holds of a model another worker loaded: nothing but the way to it."""

    def __init__(self, owner: _Owner, info: dict[str, Any]) -> None:
        self._owner = owner
        self.platform = f"{info['platform']} (worker {owner.index})"
        self.inputs = [TensorSpec.model_validate(t) for t in info["inputs"]]
        self.outputs = [TensorSpec.model_validate(t) for t in info["outputs"]]
        engine = RemoteTextEngine if info.get("renders_text") else RemoteEngine
        self.engine = engine(owner, info) if info.get("engine") else None
        self.embedder = RemoteEmbedder(owner, info) if info.get("embedder") else None
        self._closed = threading.Event()
        self._watching: socket.socket | None = None
        self._watcher = threading.Thread(target=self._watch, name=f"inhouse-standin-{owner.name}", daemon=True)
        self._watcher.start()

    def predict(self, inputs: dict[str, np.ndarray], outputs: list[str] | None) -> dict[str, np.ndarray]:
        return unpack_tensors(self._owner.call("submit", inputs=pack_tensors(inputs), outputs=outputs))

    def make_scheduler(self) -> RemoteScheduler:
        return RemoteScheduler(self._owner)

    def health(self) -> str | None:
        """Why the model cannot answer now (the repository index shows it), or None."""
        return self._owner.down

    def _watch(self) -> None:
        """Hold a connection to the owner: its end means the owner worker died; then wait until
        the restarted worker has the version again."""
        owner = self._owner
        while not self._closed.is_set():
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(owner.path)
                    self._watching = sock
                    sock.sendall(frame({"op": "watch", "args": {}}))
                    if self._closed.is_set():
                        return
                    sock.recv(1)  # returns once the owner's end closes
            except OSError:
                pass
            finally:
                self._watching = None
            if self._closed.is_set():
                return
            if owner.down is None:
                owner.down = f"held by worker {owner.index}, which is not running; it is being restarted"
                log.warning("the worker holding a model went away", extra={"model": owner.name,
                                                                           "worker": owner.index})
            self._until_ready_again()

    def _until_ready_again(self) -> None:
        owner = self._owner
        while not self._closed.wait(POLL_S):
            try:
                answer = call_blocking(owner.path, {"op": "info", "args": {"name": owner.name,
                                                                           "version": owner.version}}, timeout_s=10)
            except (OSError, ValueError):
                continue
            info = answer.get("ok") or {}
            if info.get("state") == "READY":
                owner.down = None
                log.info("the worker holding a model serves it again", extra={"model": owner.name,
                                                                            "worker": owner.index})
                return
            if info.get("settled"):
                owner.down = (f"held by worker {owner.index}, which restarted without it: "
                              f"{info.get('reason') or info.get('state')}")

    def close(self) -> None:
        self._closed.set()
        sock = self._watching
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class StandInBackend:
    """Loads a stand-in once the owner has loaded the version: a version the owner fails to load
    fails here with the owner's error, so every worker's index shows the same state."""

    name = "stand-in"

    def __init__(self, path: str, owner_index: int, unreachable_s: float = UNREACHABLE_S) -> None:
        self._path = path
        self._index = owner_index
        self._unreachable_s = unreachable_s

    def load(self, ctx: LoadContext) -> StandInModel:
        spec: ModelSpec = ctx.spec
        owner = _Owner(self._path, self._index, spec.name, int(ctx.version_dir.name))
        limit = spec.load.timeout_s
        started = last_reached = time.monotonic()
        while True:
            try:
                answer = call_blocking(self._path, {"op": "info", "args": {"name": owner.name,
                                                                           "version": owner.version}}, timeout_s=30)
                last_reached = time.monotonic()
            except (OSError, ValueError):
                answer = None
                if time.monotonic() - last_reached > self._unreachable_s:
                    raise ModelLoadError(f"Model '{spec.name}' is held by worker {self._index}, which could not be "
                                         f"reached for {self._unreachable_s:g} s; see that worker's log.") from None
            if answer is not None:
                if "error" in answer:
                    raise rebuild_error(answer["error"])
                info: dict[str, Any] = answer["ok"]
                state = info.get("state")
                if state == "READY":
                    return StandInModel(owner, info)
                if state == "FAILED":
                    err: InhouseError = ModelLoadError(str(info.get("reason") or "the load failed"))
                    if info.get("code"):
                        err.details["cause_code"] = info["code"]
                    raise err
                if state != "LOADING" and info.get("settled"):
                    raise ModelNotReadyError(f"Model '{spec.name}' is held by worker {self._index}, which has not "
                                             f"loaded it ({info.get('reason') or state}).")
                if ctx.progress is not None:
                    reason = str(info.get("reason") or "")
                    pct = _percent(reason)
                    ctx.progress(pct, f"loading in worker {self._index}")
            if limit is not None and time.monotonic() - started > limit:
                raise ModelLoadError(f"Model '{spec.name}' was not loaded by worker {self._index}, which holds "
                                     f"it, within its load.timeout_s ({limit:g} s).")
            time.sleep(POLL_S)


def _percent(reason: str) -> float:
    with contextlib.suppress(ValueError):
        return float(reason.rsplit(":", 1)[-1].strip().rstrip("%"))
    return 0.0
