"""A model's configuration in Triton's layout (``inference.ModelConfig``), for the clients and tools
written against Triton: ``tritonclient``'s ``get_model_config`` over REST and gRPC, and tools that read
``max_batch_size`` / ``input`` / ``output`` / ``dynamic_batching`` from it.

Triton's conventions apply: with ``max_batch_size > 0`` the batch dimension is implied and left out of
``dims``; ``-1`` marks a variable dimension; data types are ``TYPE_*`` names (BYTES is ``TYPE_STRING``).
The dict uses protobuf's JSON field names, so the same dict fills the gRPC message."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from inhouse.core.scheduling import DynamicBatcher

if TYPE_CHECKING:
    from inhouse.core.manager import ModelVersion
    from inhouse.core.spec import TensorSpec

_TYPE = {"BOOL": "TYPE_BOOL", "UINT8": "TYPE_UINT8", "UINT16": "TYPE_UINT16", "UINT32": "TYPE_UINT32",
         "UINT64": "TYPE_UINT64", "INT8": "TYPE_INT8", "INT16": "TYPE_INT16", "INT32": "TYPE_INT32",
         "INT64": "TYPE_INT64", "FP16": "TYPE_FP16", "FP32": "TYPE_FP32", "FP64": "TYPE_FP64",
         "BYTES": "TYPE_STRING", "BF16": "TYPE_BF16"}
_PLATFORM = {"onnxruntime": "onnxruntime_onnx", "transformers": "transformers"}
_GENERATIVE = ("chat", "generate")


def _dims(t: TensorSpec, batched: bool) -> list[int]:
    shape = list(t.shape)
    if batched and shape:
        shape = shape[1:]
    return shape


_KIND = {"cpu": "KIND_CPU", "auto": "KIND_AUTO"}


def _instances(mv: ModelVersion) -> int:
    """The instances running now (as the ``inhouse_model_instances`` gauge reads them): a pool that
    grows (``init_size`` / ``max_size``) has between the two; before its scheduler runs, the spec's count."""
    sched = mv.scheduler
    if isinstance(sched, DynamicBatcher) and sched.instance_count:
        return sched.instance_count
    return mv.spec.instances.count


def triton_config(mv: ModelVersion) -> dict[str, Any]:
    """The Triton-layout config of a loaded (or loading) model version."""
    spec = mv.spec
    inputs = mv.model.inputs if mv.model is not None else (spec.inputs or [])
    outputs = mv.model.outputs if mv.model is not None else (spec.outputs or [])
    b = spec.batching
    batched = b.max_batch_size > 0
    cfg: dict[str, Any] = {
        "name": spec.name,
        "platform": _PLATFORM.get(spec.backend, spec.backend),
        "backend": spec.backend,
        "max_batch_size": b.max_batch_size,
        "input": [{"name": t.name, "data_type": _TYPE[t.dtype], "format": "FORMAT_NONE",
                   "dims": _dims(t, batched), "optional": t.optional} for t in inputs],
        "output": [{"name": t.name, "data_type": _TYPE[t.dtype], "dims": _dims(t, batched)} for t in outputs],
        "instance_group": [{"name": f"{spec.name}_0", "count": _instances(mv),
                            "kind": _KIND.get(spec.instances.device, "KIND_GPU")}],
        "model_transaction_policy": {"decoupled": spec.task in _GENERATIVE},
    }
    if batched:
        cfg["dynamic_batching"] = {
            "preferred_batch_size": list(b.preferred_batch_sizes),
            "max_queue_delay_microseconds": int(b.max_queue_delay_ms * 1000),
            "priority_levels": b.priority_levels if b.priority_levels > 1 else 0,
        }
    return cfg
