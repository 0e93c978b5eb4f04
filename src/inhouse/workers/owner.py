"""The side of a worker that holds models for the others (``placement: one``): a Unix socket in
the supervisor's 0700 folder on which the stand-ins in other workers make engine-level calls
(chat template, tokenizer, generation stream, embeddings, ``submit`` to the model's scheduler).
Everything above the engine (security, keys, audit, metrics, streaming PII restore, tool
parsing) ran already in the worker the client reached."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from inhouse.core.manager import ModelManager, ModelState, ModelVersion
from inhouse.errors import InferenceError, InhouseError, ModelNotFoundError
from inhouse.workers.control import error_doc
from inhouse.workers.wire import frame, pack_chunk, pack_tensors, read_frame, unpack_request, unpack_tensors

log = logging.getLogger(__name__)


class ModelHost:
    """Answers the stand-ins' calls for the models this worker has loaded; ``started`` tells a
    stand-in still waiting for a version whether this worker's start-up load is over."""

    def __init__(self, manager: ModelManager, started: Callable[[], bool]) -> None:
        self._manager = manager
        self._started = started
        self._server: asyncio.AbstractServer | None = None

    async def start(self, path: str) -> None:
        self._server = await asyncio.start_unix_server(self._connected, path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            doc = await read_frame(reader)
            op, args = str(doc.get("op")), dict(doc.get("args") or {})
            if op == "generate":
                await self._generate(reader, writer, args)
            elif op == "watch":  # held open: its end tells the stand-in this worker is gone
                await reader.read()
            else:
                try:
                    writer.write(frame({"ok": await self._call(op, args)}))
                except Exception as err:  # every failure is the answer, as the stand-in raises it
                    if not isinstance(err, InhouseError):
                        log.exception("a call for a held model failed", extra={"op": op})
                    writer.write(frame({"error": error_doc(err)}))
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass  # the stand-in went away (its client did)
        finally:
            writer.close()

    @contextlib.contextmanager
    def _use(self, name: str, version: int) -> Iterator[ModelVersion]:
        """The version the stand-in stands for; during a version switch, whichever serves now
        (the stand-in of the old one retires as soon as the new one is ready everywhere)."""
        try:
            mv = self._manager.resolve(name, version)
        except ModelNotFoundError:
            mv = self._manager.resolve(name)
        mv.enter()
        try:
            yield mv
        finally:
            mv.leave()

    async def _call(self, op: str, args: dict[str, Any]) -> Any:
        name, version = str(args.get("name")), int(args.get("version") or 0)
        if op == "info":
            return self._info(name, version)
        with self._use(name, version) as mv:
            model = mv.model
            if model is None:
                raise InferenceError(f"Model '{name}' was unloaded mid-request; retry.")
            if op == "submit":
                if mv.scheduler is None:
                    raise InferenceError(f"Model '{name}' was unloaded mid-request; retry.")
                outputs = await mv.scheduler.submit(unpack_tensors(args["inputs"]), args.get("outputs"),
                                                    priority=args.get("priority"), timeout_s=args.get("timeout_s"))
                return pack_tensors(outputs)
            if op == "embed":
                vectors, tokens = await model.embedder.embed(args["inputs"])  # type: ignore[attr-defined]
                return {"vectors": pack_tensors({"v": vectors}), "tokens": tokens}
            part = getattr(model, "engine", None) or getattr(model, "embedder", None)
            if part is None:
                raise InferenceError(f"Model '{name}' has no tokenizer to call.")
            if op == "render":
                return await part.render_chat(args["messages"], args.get("tools"),
                                              add_generation_prompt=bool(args.get("add_generation_prompt", True)),
                                              **(args.get("kwargs") or {}))
            if op == "template":
                ids = await asyncio.to_thread(part.apply_chat_template, args["messages"], args.get("tools"),
                                              add_generation_prompt=bool(args.get("add_generation_prompt", True)),
                                              **(args.get("kwargs") or {}))
                return list(ids)
            if op == "encode":
                return list(await asyncio.to_thread(part.tokenizer.encode, str(args["text"]),
                                                    add_special_tokens=bool(args.get("add_special", True))))
            if op == "decode":
                return str(await asyncio.to_thread(part.tokenizer.decode, args["ids"],
                                                   skip_special_tokens=bool(args.get("skip", False))))
        raise ValueError(f"unknown call {op!r}")

    def _info(self, name: str, version: int) -> dict[str, Any]:
        """This worker's state of the version, and once READY what a stand-in needs to mirror it."""
        table = self._manager.serving().get(name) or []
        mv = next((m for m in table if m.version == version), None)
        if mv is None or mv.model is None:
            entry = next((e for e in self._manager.index() if e.name == name and e.version in (version, None)), None)
            state = entry.state if entry is not None else ModelState.UNLOADED
            return {"state": str(state), "reason": entry.reason if entry else "", "code": entry.code if entry else None,
                    "settled": self._started()}
        model = mv.model
        doc: dict[str, Any] = {"state": str(ModelState.READY), "settled": True, "platform": model.platform,
                               "inputs": [t.model_dump() for t in model.inputs],
                               "outputs": [t.model_dump() for t in model.outputs]}
        engine = getattr(model, "engine", None)
        embedder = getattr(model, "embedder", None)
        part = engine or embedder
        if part is not None:
            tok = part.tokenizer
            doc.update(max_model_len=int(part.max_model_len), vocab=len(tok),
                       chat_template=getattr(tok, "chat_template", None))
        if engine is not None:
            doc.update(engine=True, accepts_images=bool(getattr(engine, "accepts_images", False)),
                       renders_text=hasattr(engine, "render_chat"))
        if embedder is not None:
            doc.update(embedder=True)
        return doc

    async def _generate(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, args: dict[str, Any]) -> None:
        """Chunks as they come; the stand-in closing the connection cancels the sequence (its
        engine slot and cache are freed as for a local client that went away)."""
        me = asyncio.current_task()

        async def watch() -> None:
            await reader.read()  # nothing more comes but the end of the connection
            if me is not None:
                me.cancel()

        watcher = asyncio.create_task(watch())
        try:
            name, version = str(args["name"]), int(args["version"])
            with self._use(name, version) as mv:
                engine = getattr(mv.model, "engine", None)
                if engine is None:
                    raise InferenceError(f"Model '{name}' was unloaded mid-request; retry.")
                doc = args["request"]
                remaining = doc.get("remaining_s")
                request = unpack_request(doc, None if remaining is None else time.monotonic() + float(remaining))
                if doc.get("schema") is not None:
                    request.constraint = await asyncio.to_thread(_constraint, engine, doc["schema"])
                async with contextlib.aclosing(engine.generate(request)) as chunks:
                    async for chunk in chunks:
                        writer.write(frame({"chunk": pack_chunk(chunk)}))
                        await writer.drain()
            writer.write(frame({"ok": None}))
        except InhouseError as err:
            writer.write(frame({"error": error_doc(err)}))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as err:
            log.exception("a generation for a stand-in failed")
            writer.write(frame({"error": error_doc(err)}))
        finally:
            watcher.cancel()


def _constraint(engine: Any, schema: dict[str, Any]) -> Any:
    """The constraint rebuilt from its schema, as the LLM service builds it for a local client."""
    native = getattr(engine, "schema_constraint", None)
    if native is not None:
        return native(schema)
    from inhouse.llm import constraint as cons

    return cons.GrammarConstraint(cons.compile_json_schema(engine.tokenizer, schema))
