"""OpenClaw's model service over gRPC (``openclaw.api.v1.ModelService``: LoadModel, UnloadModel,
ListModels), served beside KServe's repository RPCs on the same port. Each RPC parses, calls
the data plane and renders; a refusal or failure is a gRPC status rendered by
``protocols/errors.py``, so an OK answer always says ``success: true``."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from inhouse.core.dataplane import DataPlane
from inhouse.errors import InvalidRequestError
from inhouse.protocols.errors import grpc_abort
from inhouse.protocols.proto import openclaw_model_service_pb2 as pb
from inhouse.protocols.proto import openclaw_model_service_pb2_grpc as pb_grpc
from inhouse.security.pipeline import Guard

SERVICE_NAME = "openclaw.api.v1.ModelService"
_Resp = TypeVar("_Resp")
_Handler = Callable[[Any, Any, grpc.aio.ServicerContext], Awaitable[_Resp]]

_RPC = f"/{SERVICE_NAME}/"
RPC_GUARDS: dict[str, Guard] = {
    _RPC + "LoadModel": Guard("openclaw.load", "admin", model="model_name"),
    _RPC + "UnloadModel": Guard("openclaw.unload", "admin", model="model_name"),
    _RPC + "ListModels": Guard("openclaw.list", "admin"),
}
"""Managing models is an admin's job, whatever the key's model list says about inference."""


def _unary(fn: _Handler[_Resp]) -> _Handler[_Resp]:
    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> _Resp:
        try:
            return await fn(self, request, context)
        except Exception as exc:
            await grpc_abort(context, exc)
            raise  # unreachable: abort raises
    return wrapper


def _required(value: str, field: str, message: str) -> str:
    if not value.strip():
        raise InvalidRequestError(f"{message}.{field} is empty; it is required.")
    return value.strip()


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    @_unary
    async def LoadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = _required(request.model_name, "model_name", "LoadModelRequest")
        path = _required(request.model_path, "model_path", "LoadModelRequest")
        versions = await self._dp.load_model_from(name, path, request.config_path.strip())
        served = [str(mv.version) for mv in versions]
        return pb.LoadModelResponse(
            success=True, state="READY", versions=served,
            message=f"Model '{name}' is ready (version {', '.join(served)}) from {path}.",
        )

    @_unary
    async def UnloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = _required(request.model_name, "model_name", "UnloadModelRequest")
        versions = await self._dp.unload_model(name)
        return pb.UnloadModelResponse(
            success=True, state="UNLOADED",
            message=f"Model '{name}' is unloaded (version {', '.join(str(mv.version) for mv in versions)}).",
        )

    @_unary
    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        repo = self._dp.manager.repository
        out = []
        for e in self._dp.repository_index():
            link = repo.linked(e.name)
            out.append(pb.ModelStatus(
                model_name=e.name, version="" if e.version is None else str(e.version), state=str(e.state),
                reason=e.reason, error_code=e.code or 0, model_path=str(link.folder) if link else "",
            ))
        return pb.ListModelsResponse(models=out)
