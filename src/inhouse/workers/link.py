"""A worker's side of the control channel: model lifecycle changes go through the supervisor,
which applies them to every worker before the caller gets its answer, and ``/metrics`` is the
sum over all workers."""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric

from inhouse.core.dataplane import DataPlane, ServerState, SourceCheck
from inhouse.core.manager import ModelManager, ModelVersion
from inhouse.errors import InhouseError
from inhouse.workers.control import Channel
from inhouse.workers.metrics_merge import exposition, merge, render_merged

log = logging.getLogger(__name__)

OP_TIMEOUT_S = 3600.0  # a load may take long (a big model); the supervisor answers when every worker has


class WorkerLink:
    """The connection to the supervisor (``path``: its Unix socket) of worker number ``index``
    of ``count``."""

    def __init__(self, path: str, index: int, count: int = 1) -> None:
        self.path = path
        self.index = index
        self.count = count
        self.folder = Path(path).parent  # the supervisor's 0700 folder: the workers' sockets live there
        self.pid = os.getpid()
        self._channel: Channel | None = None
        self.dataplane: WorkerDataPlane | None = None
        self.registry: CollectorRegistry | None = None

    @property
    def channel(self) -> Channel:
        if self._channel is None:
            raise RuntimeError("the worker is not connected to its supervisor")
        return self._channel

    async def connect(self) -> None:
        reader, writer = await asyncio.open_unix_connection(self.path)
        self._channel = Channel(reader, writer, self._handle)

    async def tell(self, what: str) -> None:
        """``built`` (the stores are open: the next worker may start) or ``ready``."""
        await self.channel.request(what, index=self.index, pid=self.pid)

    async def sync(self) -> None:
        """Apply the lifecycle changes made before this worker started (it may be a restarted one)."""
        if self.dataplane is None:
            return
        for change in await self.channel.request("changes"):
            try:
                await self.dataplane.apply(change)
            except InhouseError as err:  # e.g. a model unloaded then, which this worker never loaded
                log.info("lifecycle change not applied in this worker", extra={
                    "op": change.get("op"), "model": change.get("name"), "code": err.code, "reason": err.message})

    async def metric_families(self) -> list[Metric]:
        """Every worker's metrics added up, as families (the console's live figures)."""
        texts: list[str] = await self.channel.request("metrics", limit_s=30)
        return merge(texts)

    async def render_metrics(self, accept: str | None) -> tuple[bytes, str]:
        return render_merged(await self.metric_families(), accept)

    async def _handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "apply" and self.dataplane is not None:
            return await self.dataplane.apply(dict(args["change"]))
        if op == "exposition" and self.registry is not None:
            return exposition(self.registry)
        raise ValueError(f"unknown control operation {op!r}")

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class WorkerDataPlane(DataPlane):
    """The data plane of one worker: loads and unloads are sent to the supervisor, which calls
    ``apply`` in every worker (this one included) and answers once all have applied them."""

    def __init__(self, manager: ModelManager, link: WorkerLink, state: ServerState | None = None,
                 check_source: SourceCheck | None = None) -> None:
        super().__init__(manager, state, check_source)
        self.link = link
        link.dataplane = self
        self._applied: dict[str, list[ModelVersion]] = {}

    def server_metadata(self) -> dict[str, Any]:
        # which process answered (v2 clients ignore keys they do not know)
        return {**super().server_metadata(), "worker": {"index": self.link.index, "pid": self.link.pid}}

    async def _everywhere(self, change: dict[str, Any]) -> list[ModelVersion]:
        token = secrets.token_hex(8)
        try:
            await self.link.channel.request("change", limit_s=OP_TIMEOUT_S, change={**change, "token": token})
            return self._applied.get(token, [])
        finally:
            self._applied.pop(token, None)

    async def load_model(self, name: str, overrides: dict[str, Any] | None = None) -> list[ModelVersion]:
        if overrides and "source" in overrides and self._check_source is not None:
            self._check_source(overrides["source"], self.manager.repository.model_dir(name))
        self.manager.repository.model_dir(name)  # an unknown name is 1002 here, without a round trip
        return await self._everywhere({"op": "load", "name": name, "overrides": overrides})

    async def load_model_from(self, name: str, model_path: str, config_path: str = "") -> list[ModelVersion]:
        if self._check_source is not None:  # refused here already, not in every worker
            root = self.manager.repository.root
            self._check_source(model_path, root, what="model_path")
            if config_path:
                self._check_source(config_path, root, what="config_path")
        return await self._everywhere({"op": "load_from", "name": name, "model_path": model_path,
                                       "config_path": config_path})

    async def unload_model(self, name: str) -> list[ModelVersion]:
        return await self._everywhere({"op": "unload", "name": name})

    async def apply(self, change: dict[str, Any]) -> list[int]:
        """Apply one lifecycle change here (the supervisor calls this in every worker)."""
        op, name = change["op"], str(change["name"])
        if op == "load":
            versions = await super().load_model(name, change.get("overrides"))
        elif op == "load_from":
            versions = await super().load_model_from(name, str(change["model_path"]),
                                                     str(change.get("config_path") or ""))
        elif op == "unload":
            versions = await super().unload_model(name)
        else:
            raise ValueError(f"unknown lifecycle change {op!r}")
        token = change.get("token")
        if token:
            self._applied[str(token)] = versions
        return [mv.version for mv in versions]


def control_path(folder: Path) -> str:
    return str(folder / "control.sock")
