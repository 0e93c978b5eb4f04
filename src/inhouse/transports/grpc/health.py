"""gRPC health checking (``grpc.health.v1.Health``) answered from the data plane.

Service names: ``""`` (the server) and ``inference.GRPCInferenceService`` are SERVING when the
server is ready; a model's name is SERVING while a version of it is ready, NOT_SERVING while
it is not, and unknown (NOT_FOUND / SERVICE_UNKNOWN) when the repository has no such model."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from inhouse.core.dataplane import DataPlane
from inhouse.errors import InhouseError, ModelNotFoundError
from inhouse.protocols.errors import grpc_abort
from inhouse.protocols.kserve_v2.grpc_service import SERVICE_NAME
from inhouse.security.pipeline import READINESS, Guard

RPC_GUARDS: dict[str, Guard] = {f"/grpc.health.v1.Health/{name}": READINESS for name in ("Check", "Watch")}
"""Health checks report readiness: open (not checked, not audited; a load balancer has no key)
unless the server sets ``open_readiness: false``."""

_SERVING: int = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING: int = health_pb2.HealthCheckResponse.NOT_SERVING
_UNKNOWN: int = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN


class HealthServicer(health_pb2_grpc.HealthServicer):  # type: ignore[misc]  # untyped base
    """``recheck_s``: how often Watch re-reads the state besides on model state changes (server
    readiness changes are not events)."""

    def __init__(self, dataplane: DataPlane, recheck_s: float = 1.0) -> None:
        self._dp = dataplane
        self._recheck_s = recheck_s
        self._changed = asyncio.Event()
        dataplane.manager.listeners.append(self._on_change)

    def _on_change(self, *_: Any) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    def status(self, service: str) -> int:
        if service in ("", SERVICE_NAME):
            return _SERVING if self._dp.ready() else _NOT_SERVING
        try:
            self._dp.manager.repository.model_dir(service)
        except InhouseError:
            return _UNKNOWN
        return _SERVING if self._dp.model_ready(service) else _NOT_SERVING

    async def Check(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        status = self.status(request.service)
        if status == _UNKNOWN:
            await grpc_abort(context, ModelNotFoundError(
                f"Unknown service '{request.service}': not a model in the repository."))
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        last: int | None = None
        while True:
            changed = self._changed
            status = self.status(request.service)
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), self._recheck_s)
