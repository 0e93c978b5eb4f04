"""OpenClaw's model service over gRPC (``openclaw.api.v1.ModelService``: LoadModel, UnloadModel,
ListModels), served beside KServe's repository RPCs on the same port. Each RPC parses, calls
the data plane and renders; a refusal or failure is a gRPC status rendered by
``protocols/errors.py``, so an OK answer always says ``success: true``."""

from __future__ import annotations

from typing import Any

import grpc

from inhouse.core.dataplane import DataPlane
from inhouse.errors import InvalidRequestError
from inhouse.protocols.errors import grpc_errors
from inhouse.protocols.proto import openclaw_model_service_pb2 as pb
from inhouse.protocols.proto import openclaw_model_service_pb2_grpc as pb_grpc
from inhouse.security.pipeline import Guard

SERVICE_NAME = "openclaw.api.v1.ModelService"

_RPC = f"/{SERVICE_NAME}/"
RPC_GUARDS: dict[str, Guard] = {
    _RPC + "LoadModel": Guard("openclaw.load", "admin", model="model_name"),
    _RPC + "UnloadModel": Guard("openclaw.unload", "admin", model="model_name"),
    _RPC + "ListModels": Guard("openclaw.list", "admin"),
}
"""Managing models is an admin's job, whatever the key's model list says about inference."""



def _required(value: str, field: str, message: str) -> str:
    if not value.strip():
        raise InvalidRequestError(f"{message}.{field} is empty; it is required.")
    return value.strip()


class ModelServicer(pb_grpc.ModelServiceServicer):
    def __init__(self, dataplane: DataPlane) -> None:
        self._dp = dataplane

    @grpc_errors
    async def LoadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = _required(request.model_name, "model_name", "LoadModelRequest")
        path = _required(request.model_path, "model_path", "LoadModelRequest")
        versions = await self._dp.load_model_from(name, path, request.config_path.strip())
        served = [str(mv.version) for mv in versions]
        return pb.LoadModelResponse(
            success=True, state="READY", versions=served,
            message=f"Model '{name}' is ready (version {', '.join(served)}) from {path}.",
        )

    @grpc_errors
    async def UnloadModel(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        name = _required(request.model_name, "model_name", "UnloadModelRequest")
        versions = await self._dp.unload_model(name)
        return pb.UnloadModelResponse(
            success=True, state="UNLOADED",
            message=f"Model '{name}' is unloaded (version {', '.join(str(mv.version) for mv in versions)}).",
        )

    @grpc_errors
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
