"""The model spec (``model.yaml``): parsing, validation with user-facing messages, defaults."""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from inhouse.core.datatypes import DATATYPES
from inhouse.core.triton_pbtxt import spec_from_pbtxt
from inhouse.errors import ModelSpecError

SPEC_FILENAMES = ("model.yaml", "model_spec.yaml", "config.pbtxt")  # the first one found is read


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


_DIM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*$")


class TensorSpec(_Strict):
    name: str
    dtype: str = Field(description="KServe v2 datatype (" + ", ".join(DATATYPES) + ") or its numpy "
                       "name (int64, float32, …)")
    shape: list[int] = Field(description="-1 or a name (batch, sequence, …) marks a dynamic dimension")
    # the names written in ``shape`` ([None, "sequence"]); a name used twice across one model's
    # inputs must have one size per request. Set from ``shape``, never written in model.yaml.
    dim_names: list[str | None] | None = Field(default=None, exclude=True, repr=False)
    pad_value: float | int | None = Field(
        default=None, description="If set, variable-length inputs are padded with it to batch together"
    )
    optional: bool = False

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        if isinstance(v, str):
            up = v.upper()
            aliases = {"FLOAT32": "FP32", "FLOAT": "FP32", "FLOAT16": "FP16", "FLOAT64": "FP64",
                       "DOUBLE": "FP64", "HALF": "FP16", "STRING": "BYTES", "STR": "BYTES", "OBJECT": "BYTES",
                       "BOOL_": "BOOL", "TYPE_FP32": "FP32"}
            up = aliases.get(up, up)
            if up not in DATATYPES:
                raise ValueError(f"'{v}' is not a datatype; write one of {', '.join(DATATYPES)}")
            return up
        return v

    @model_validator(mode="before")
    @classmethod
    def _named_dims(cls, data: Any) -> Any:
        """Named dimensions (``[batch, sequence]``, as the deployment guides write them) are
        dynamic; their names are kept beside the shape for the request-time agreement check."""
        if not isinstance(data, dict):
            return data
        if "dim_names" in data:
            raise ValueError("dim_names is not a key of its own; write the names in shape, e.g. [batch, sequence]")
        shape = data.get("shape")
        if not isinstance(shape, list) or not any(isinstance(d, str) for d in shape):
            return data
        names: list[str | None] = []
        dims: list[Any] = []
        for d in shape:
            if isinstance(d, str) and d.strip().lstrip("-").isdigit():
                d = int(d)
            if isinstance(d, str):
                if not _DIM_NAME.match(d):
                    raise ValueError(f"shape dimension {d!r} is neither a number nor a name such as 'batch'")
                names.append(d)
                dims.append(-1)
            else:
                names.append(None)
                dims.append(d)
        return {**data, "shape": dims, "dim_names": names}

    @field_validator("shape")
    @classmethod
    def _shape(cls, v: list[int]) -> list[int]:
        if any(d < -1 or d == 0 for d in v):
            raise ValueError("dimensions must be positive integers, or -1 for a dynamic dimension")
        return v


class BatchingSpec(_Strict):
    max_batch_size: int = Field(default=0, ge=0, description="0 disables dynamic batching")
    preferred_batch_sizes: list[int] = Field(default_factory=list)
    max_queue_delay_ms: float = Field(default=0.0, ge=0)
    max_queue_size: int = Field(default=1024, ge=1)
    default_timeout_ms: float | None = Field(default=None, gt=0)
    priority_levels: int = Field(default=1, ge=1, le=16)

    @model_validator(mode="after")
    def _preferred(self) -> BatchingSpec:
        bad = [b for b in self.preferred_batch_sizes if b < 1 or (self.max_batch_size and b > self.max_batch_size)]
        if bad:
            raise ValueError(f"preferred_batch_sizes {bad} must lie between 1 and max_batch_size")
        return self


class InstancesSpec(_Strict):
    count: int = Field(default=1, ge=1, le=64, description="a fixed pool; with init_size / max_size: "
                       "the initial size")
    init_size: int | None = Field(default=None, ge=1, le=64, description="instances at load (a pool that grows)")
    max_size: int | None = Field(default=None, ge=1, le=64, description="the most the pool grows to under load")
    idle_s: float | None = Field(default=None, gt=0, description="an instance beyond init_size idle this long "
                                 "stops [60]")
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?|gpu(:\d+)?|npu(:\d+)?|auto)$")

    @model_validator(mode="after")
    def _pool(self) -> InstancesSpec:
        """``count`` is a fixed pool; ``init_size`` / ``max_size`` (the guides' names) one that
        grows from init to max under load and shrinks back when idle."""
        if self.init_size is None and self.max_size is None:
            return self
        written = self.count if "count" in self.model_fields_set else None
        if written is not None and self.init_size is not None and written != self.init_size:
            raise ValueError(f"count {written} contradicts init_size {self.init_size}; write count (a fixed "
                             "pool) or init_size / max_size (a pool that grows)")
        init = self.init_size or written or 1
        top = self.max_size if self.max_size is not None else init
        if top < init:
            raise ValueError(f"max_size {top} is smaller than init_size {init}")
        self.init_size, self.max_size, self.count = init, top, init
        return self

    @property
    def initial(self) -> int:
        return self.init_size or self.count

    @property
    def maximum(self) -> int:
        return self.max_size or self.count

    @property
    def idle_after_s(self) -> float:
        return self.idle_s or 60.0


class LoadSpec(_Strict):
    timeout_s: float | None = Field(default=None, gt=0, description="a load (backend load and warm-up) "
                                    "running longer fails with 1009; unset: the server's load_timeout_s")


class VersionPolicy(_Strict):
    policy: Literal["latest", "all", "specific"] = "latest"
    keep: int = Field(default=1, ge=1, description="with policy latest: how many newest versions serve")
    versions: list[int] = Field(default_factory=list, description="with policy specific")

    @model_validator(mode="after")
    def _specific(self) -> VersionPolicy:
        if self.policy == "specific" and not self.versions:
            raise ValueError("policy 'specific' needs a list, e.g. versions: [1, 3]")
        return self


class ResponseCacheSpec(_Strict):
    """This model's answers in the response cache (Triton's per-model ``response_cache``)."""

    enabled: bool | None = Field(default=None, description="unset: the server's cache.enabled")
    ttl_s: float | None = Field(default=None, gt=0, description="unset: the server's cache.ttl_s")


class WarmupSpec(_Strict):
    samples: int = Field(default=0, ge=0, le=1024)
    file: str | None = Field(default=None, description="an .npz of sample inputs, relative to the model folder")


class FilesSpec(_Strict):
    sha256: dict[str, str] = Field(default_factory=dict)

    @field_validator("sha256")
    @classmethod
    def _hex(cls, v: dict[str, str]) -> dict[str, str]:
        for path, digest in v.items():
            if len(digest) != 64 or any(c not in "0123456789abcdefABCDEF" for c in digest):
                raise ValueError(f"checksum for '{path}' must be 64 hex characters (sha256)")
        return {k: d.lower() for k, d in v.items()}


class EncryptionSpec(_Strict):
    key_id: str = "default"


class PolicySpec(_Strict):
    """Content policy, checked before a request reaches the model (error 5001)."""

    deny_patterns: list[str] = Field(default_factory=list, description="regular expressions; a match blocks")
    max_input_bytes: int | None = Field(default=None, ge=1, description="request body size limit")
    allowed_tools: list[str] | None = Field(default=None, description="tool names a request may offer")

    @field_validator("deny_patterns")
    @classmethod
    def _compiles(cls, v: list[str]) -> list[str]:
        for pattern in v:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"deny pattern {pattern!r} is not a valid regular expression: {err}") from None
        return v


PiiDetector = Literal["email", "cn_id", "phone", "bank_card", "ip"]
PII_DETECTORS: tuple[PiiDetector, ...] = ("email", "cn_id", "phone", "bank_card", "ip")


class PiiSpec(_Strict):
    """PII redaction for this model's traffic (logs and the audit log are always redacted)."""

    inputs: bool = Field(default=False, description="replace PII with placeholders before the model sees it")
    outputs: Literal["off", "restore", "redact"] = Field(
        default="restore", description="restore: put the originals back in the answer; redact: mask PII")
    detectors: list[PiiDetector] = Field(default_factory=lambda: list(PII_DETECTORS))
    outbound: Literal["redact", "refuse", "allow"] = Field(
        default="redact", description="backend: upstream: what happens to PII before a request leaves the "
        "machine; redact: numbered placeholders, restored in the answer; refuse: 5001")


class UpstreamTlsSpec(_Strict):
    ca_file: str | None = Field(default=None, description="CA bundle that signed the upstream's certificate "
                                "(default: the system's)")
    cert_file: str | None = Field(default=None, description="client certificate, for an upstream with mutual TLS")
    key_file: str | None = None

    @model_validator(mode="after")
    def _pair(self) -> UpstreamTlsSpec:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together; set both or neither")
        return self


class CircuitSpec(_Strict):
    failures: int = Field(default=5, ge=1, description="consecutive failed calls that open the circuit")
    reset_s: float = Field(default=10.0, gt=0, description="how long it stays open before one trial call")


class UpstreamSpec(_Strict):
    """``backend: upstream``: a model served by another endpoint (another inhouse, a KServe v2
    server, an OpenAI-compatible server)."""

    url: str = Field(pattern=r"^https?://[^\s/]+", description="base URL, e.g. https://gpu-box:8000")
    protocol: Literal["v2", "openai"] = Field(default="v2", description="v2: KServe v2 infer; openai: chat "
                                              "completions")
    model: str | None = Field(default=None, description="the model's name there (default: this model's name)")
    api_key_env: str | None = Field(default=None, description="environment variable holding the upstream's key")
    api_key_file: str | None = Field(default=None, description="file holding the upstream's key")
    tls: UpstreamTlsSpec = Field(default_factory=UpstreamTlsSpec)
    timeout_s: float = Field(default=30.0, gt=0, description="per call, connect included")
    connect_timeout_s: float = Field(default=3.0, gt=0)
    retries: int = Field(default=2, ge=0, le=10, description="retries after a connect error (only then: a "
                         "request that may have reached the upstream is never sent twice)")
    circuit: CircuitSpec = Field(default_factory=CircuitSpec)
    health_interval_s: float = Field(default=10.0, gt=0, description="how often the upstream is checked")

    @model_validator(mode="after")
    def _one_key(self) -> UpstreamSpec:
        if self.api_key_env is not None and self.api_key_file is not None:
            raise ValueError("set api_key_env or api_key_file, not both")
        return self


class OverflowWhen(_Strict):
    queue_above: int | None = Field(default=None, ge=0, description="requests queued for the local model")
    predicted_wait_ms_above: float | None = Field(default=None, ge=0, description="the local queue's "
                                                  "predicted wait")

    @model_validator(mode="after")
    def _one(self) -> OverflowWhen:
        if self.queue_above is None and self.predicted_wait_ms_above is None:
            raise ValueError("name queue_above or predicted_wait_ms_above")
        return self


class OverflowSpec(_Strict):
    """Send requests elsewhere while this (local) model is saturated."""

    to: str = Field(description="the model that takes the overflow (typically backend: upstream)")
    when: OverflowWhen
    fallback: str | None = Field(default=None, description="the model that answers while 'to' is down; "
                                 "none: 503 (3006)")


class ProviderSpec(_Strict):
    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class OnnxRuntimeSpec(_Strict):
    providers: list[ProviderSpec | str] = Field(default_factory=list)
    intra_op_threads: int = Field(default=0, ge=0)
    inter_op_threads: int = Field(default=0, ge=0)
    graph_optimization_level: Literal["disable", "basic", "extended", "all"] = "all"
    execution_mode: Literal["sequential", "parallel"] = "sequential"
    spinning: bool | None = Field(default=None, description="onnxruntime worker-thread spin-waiting")
    file: str = Field(default="model.onnx", description="artefact name inside the version folder")

    def provider_list(self) -> list[ProviderSpec]:
        return [ProviderSpec(name=p) if isinstance(p, str) else p for p in self.providers]


class EngineSpec(_Strict):
    """Generation engine limits (``backend: transformers``, task chat/generate)."""

    max_num_seqs: int = Field(default=16, ge=1, le=1024)
    max_num_batched_tokens: int = Field(default=4096, ge=16)
    prefix_caching: bool = True
    kv_cache_bytes: int | None = Field(default=None, ge=1, description="KV cache budget on CPU")
    gpu_memory_fraction: float = Field(default=0.85, gt=0, le=1)


class LlamaCppSpec(_Strict):
    """``backend: llamacpp``: how inhouse runs llama.cpp's ``llama-server`` for one GGUF model."""

    file: str | None = Field(default=None, description="the .gguf file (or a split's first part) in the "
                             "version folder; default: the only one there")
    ctx_size: int = Field(default=4096, ge=16, description="context length of each request")
    parallel: int = Field(default=4, ge=1, le=256, description="requests decoded at once (slots)")
    threads: int | None = Field(default=None, ge=1)
    gpu_layers: int | None = Field(default=None, ge=0, description="layers offloaded to the GPU")
    cache_type_k: str | None = Field(default=None, description="KV cache type, e.g. f16, q8_0")
    cache_type_v: str | None = None
    flash_attn: Literal["on", "off", "auto"] | None = None
    mmproj: str | None = Field(default=None, description="multimodal projector file in the version folder")
    chat_template: str = Field(default="gguf", description="'gguf': the file's own Jinja template; else the "
                               "name of one of llama-server's built-in templates (chatml, llama3, …)")
    extra_args: list[str] = Field(default_factory=list, description="more llama-server arguments")
    startup_timeout_s: float = Field(default=600.0, gt=0)
    restarts: int = Field(default=3, ge=0, description="restarts after a crash before giving up")


class VllmSpec(_Strict):
    """``backend: vllm``: how inhouse runs ``vllm serve`` for one Hugging Face model folder."""

    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1, description="share of each GPU "
                                                 "vLLM may take; default: engine.gpu_memory_fraction")
    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs the model is split over")
    quantization: str | None = Field(default=None, description="awq | gptq | fp8 | …; default: what the "
                                     "checkpoint says")
    max_num_seqs: int | None = Field(default=None, ge=1, description="default: engine.max_num_seqs")
    max_model_len: int | None = Field(default=None, ge=16, description="default: the top-level max_model_len, "
                                      "else the model's")
    tool_call_parser: str | None = Field(default=None, description="vLLM's own parser for its chat endpoint "
                                         "(--tool-call-parser); inhouse parses with the top-level one")
    reasoning_parser: str | None = Field(default=None, description="vLLM's --reasoning-parser")
    images: bool | None = Field(default=None, description="the model reads images (a vision-language model); "
                                "default: what its config.json says (vision_config, a known VLM type)")
    dtype: str | None = Field(default=None, description="default: the top-level dtype")
    extra_args: list[str] = Field(default_factory=list, description="more 'vllm serve' arguments")
    startup_timeout_s: float = Field(default=1200.0, gt=0)
    restarts: int = Field(default=3, ge=0, description="restarts after a crash before giving up")
class RayAutoscalingSpec(_Strict):
    """Ray Serve's autoscaling on ongoing requests per replica (``ray.autoscaling``)."""

    min_replicas: int = Field(default=1, ge=0)
    max_replicas: int = Field(default=2, ge=1)
    target_ongoing_requests: float = Field(default=2.0, gt=0, description="requests in flight per replica "
                                           "that Ray Serve keeps replicas for")
    upscale_delay_s: float = Field(default=3.0, ge=0)
    downscale_delay_s: float = Field(default=10.0, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> RayAutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) is above max_replicas ({self.max_replicas})")
        return self


class RaySpec(_Strict):
    """How a model runs on Ray Serve when the server has Ray on (``--ray``): a deployment of
    ``replicas`` (or an autoscaled number of) replicas, each one inhouse backend."""

    enabled: bool = Field(default=True, description="false: keep this model in the server process")
    replicas: int = Field(default=1, ge=1, le=256, description="fixed replica count (without autoscaling)")
    num_cpus: float = Field(default=1.0, ge=0, description="CPUs Ray reserves per replica")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs Ray reserves per replica (fractions share one)")
    max_ongoing_requests: int = Field(default=16, ge=1, description="requests one replica takes at once")
    max_replicas_per_node: int | None = Field(default=None, ge=1, description="1 spreads replicas over nodes")
    autoscaling: RayAutoscalingSpec | None = None


_MEMORY = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?|[kmgtp]|)B?\s*$")
_MEMORY_UNITS = {"": 1, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15,
                 "KI": 2**10, "MI": 2**20, "GI": 2**30, "TI": 2**40, "PI": 2**50}


def parse_memory(value: int | float | str) -> int:
    """Bytes of a Kubernetes-style quantity: ``8Gi`` (binary), ``8G`` (decimal), or a number."""
    if isinstance(value, bool):
        raise ValueError("memory must be a size such as 8Gi or 512Mi")
    if isinstance(value, int | float):
        if value <= 0:
            raise ValueError("memory must be positive")
        return int(value)
    m = _MEMORY.match(value)
    if m is None:
        raise ValueError(f"memory {value!r} is not a size; write e.g. 8Gi, 512Mi or 2G")
    size = int(float(m.group(1)) * _MEMORY_UNITS[m.group(2).upper()])
    if size <= 0:
        raise ValueError("memory must be positive")
    return size


class ResourcesSpec(_Strict):
    """What a model needs from the machine (the deployment guides' ``resources``)."""

    cpu: float | None = Field(default=None, gt=0, description="cores; sets onnxruntime.intra_op_threads when "
                              "that is not set (Kubernetes millicores like 500m are accepted)")
    memory: int | None = Field(default=None, description="RAM the model needs (8Gi, 512Mi, 2G); checked "
                               "against available memory before loading (1003 when it cannot fit)")
    gpu: int = Field(default=0, ge=0, description="GPUs; > 0 places the model on the first CUDA device")
    allow_cpu_fallback: bool = Field(default=False, description="with gpu > 0: run on the CPU when no GPU "
                                     "is present instead of failing the load")

    @field_validator("cpu", mode="before")
    @classmethod
    def _cpu(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            try:
                return float(text[:-1]) / 1000 if text.endswith("m") else float(text)
            except ValueError:
                raise ValueError(f"cpu {v!r} is not a number of cores (2, 0.5 or 500m)") from None
        return v

    @field_validator("memory", mode="before")
    @classmethod
    def _memory(cls, v: Any) -> Any:
        return None if v is None else parse_memory(v)


# model.yaml ``format`` (as the deployment guides write it) → the backend that serves it
FORMAT_BACKENDS: dict[str, str] = {
    "onnx": "onnxruntime",
    "transformers": "transformers", "huggingface": "transformers", "hf": "transformers",
    "safetensors": "transformers", "pytorch": "transformers",
    "gguf": "llamacpp",
}


def _resolve_format(data: dict[str, Any]) -> dict[str, Any]:
    """``format: ONNX`` and ``engine: onnxruntime`` name the backend; they must agree with each
    other and with ``backend`` when several are written."""
    out = dict(data)
    named: list[tuple[str, str]] = []
    if isinstance(out.get("backend"), str):
        named.append(("backend", out["backend"]))
    engine = out.get("engine")
    if isinstance(engine, str):
        named.append(("engine", engine))
        del out["engine"]
    fmt = out.pop("format", None)
    if fmt is not None:
        backend = FORMAT_BACKENDS.get(str(fmt).strip().lower())
        if backend is None:
            raise PydanticCustomError(
                "format", "format '{fmt}' is not one inhouse serves; write one of {known}",
                {"fmt": fmt, "known": ", ".join(sorted(FORMAT_BACKENDS))})
        named.append((f"format {fmt}", backend))
    if named:
        first_key, first = named[0]
        for key, value in named[1:]:
            if value != first:
                raise PydanticCustomError(
                    "backend_conflict", "{a} ({b}) contradicts {c} ({d}); write one of them, or make them agree",
                    {"a": key, "b": value, "c": first_key, "d": first})
        out["backend"] = first
    return out


class ModelSpec(BaseModel):
    """Everything inhouse needs to serve one model. Unknown keys are rejected with a suggestion,
    except under ``parameters`` (free-form, passed to the backend) and the sections owned by
    optional backends, which they validate themselves."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
    version: str | None = Field(default=None, max_length=128, description="a label for people (1.0.0), "
                                "shown in model metadata; serving versions are the numbered folders")
    backend: str = "onnxruntime"
    task: Literal["tensor", "embedding", "classification", "chat", "generate"] = "tensor"
    description: str = ""
    inputs: list[TensorSpec] | None = None
    outputs: list[TensorSpec] | None = None
    batching: BatchingSpec = Field(default_factory=BatchingSpec)
    instances: InstancesSpec = Field(default_factory=InstancesSpec)
    versions: VersionPolicy = Field(default_factory=VersionPolicy)
    warmup: WarmupSpec = Field(default_factory=WarmupSpec)
    load: LoadSpec = Field(default_factory=LoadSpec)
    response_cache: ResponseCacheSpec | None = None
    files: FilesSpec = Field(default_factory=FilesSpec)
    encryption: EncryptionSpec | None = None
    policy: PolicySpec | None = None
    pii: PiiSpec | None = None
    onnxruntime: OnnxRuntimeSpec = Field(default_factory=OnnxRuntimeSpec)
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec)
    labels: list[str] | None = Field(default=None, description="class names, for classification models")
    # ---- transformers backend: encoders and causal LMs ----
    source: str | None = Field(default=None, description="a local Hugging Face folder (absolute, or "
                               "relative to the version folder); never downloaded")
    served_names: list[str] = Field(default_factory=list, description="extra names clients may use")
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1, description="largest image a chat may send "
                                 "(decoded bytes); larger answers 413")
    max_model_len: int | None = Field(default=None, ge=16)
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    chat_template: str | None = Field(default=None, description="Jinja template overriding the tokenizer's")
    tool_call_parser: str | None = Field(default=None, description="hermes | llama3_json | mistral")
    reasoning_parser: str | None = Field(default=None, description="think_tags")
    pooling: Literal["mean", "cls", "last"] = "mean"
    normalize: bool = True
    engine: EngineSpec = Field(default_factory=EngineSpec)
    llamacpp: LlamaCppSpec = Field(default_factory=LlamaCppSpec)
    upstream: UpstreamSpec | None = None
    overflow: OverflowSpec | None = None
    vllm: VllmSpec = Field(default_factory=VllmSpec)
    ray: RaySpec | None = Field(default=None, description="placement on Ray Serve (with --ray)")
    placement: Literal["each", "one"] | None = Field(
        default=None, description="with workers above 1: 'each' worker loads its own copy, or 'one' worker "
        "holds it and the others route to it; unset: 'one' for generative LLM backends and models whose files "
        "exceed the server's placement_one_above_mb, else 'each'")
    parameters: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _guide_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("version"), int | float) \
                and not isinstance(data.get("version"), bool):
            data = {**data, "version": str(data["version"])}  # version: 1 is a label too
        return _resolve_format(data) if isinstance(data, dict) else data

    @model_validator(mode="after")
    def _apply_resources(self) -> ModelSpec:
        """``resources`` fills the settings it implies, unless they are written explicitly."""
        res = self.resources
        if res.cpu is not None and "intra_op_threads" not in self.onnxruntime.model_fields_set:
            self.onnxruntime.intra_op_threads = max(1, round(res.cpu))
        if res.gpu > 0:
            if "device" in self.instances.model_fields_set:
                if not self.instances.device.startswith(("cuda", "gpu", "auto")):
                    raise ValueError(f"resources.gpu: {res.gpu} contradicts instances.device: "
                                     f"{self.instances.device}; remove one of them")
            else:
                # auto: the GPU when there is one, else the CPU (the fallback the spec allows)
                self.instances.device = "auto" if res.allow_cpu_fallback else "cuda"
        return self

    @model_validator(mode="after")
    def _upstream(self) -> ModelSpec:
        if (self.backend == "upstream") != (self.upstream is not None):
            raise ValueError("backend: upstream and an 'upstream' section go together")
        if self.upstream is not None and "count" not in self.instances.model_fields_set \
                and self.instances.init_size is None and self.instances.max_size is None:
            self.instances.count = 8  # an instance is one call in flight upstream, mostly waiting
        if self.overflow is not None and self.name in (self.overflow.to, self.overflow.fallback):
            raise ValueError("overflow.to and overflow.fallback must name other models")
        return self

    @model_validator(mode="after")
    def _unique_names(self) -> ModelSpec:
        for kind in ("inputs", "outputs"):
            tensors = getattr(self, kind) or []
            names = [t.name for t in tensors]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"{kind} names must be unique; {dupes} appear more than once")
        return self


def _known_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The field names valid at the parent of ``loc``, for "did you mean" suggestions."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(current, "model_fields", {}).get(part)
        if field is None:
            return []
        ann = field.annotation
        current = _model_in(ann)
        if current is None:
            return []
    return list(getattr(current, "model_fields", {}))


def _model_in(ann: Any) -> type[BaseModel] | None:
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(source: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
        if e["type"] == "extra_forbidden":
            known = _known_fields(ModelSpec, loc)
            guess = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"valid keys here: {', '.join(known)}"
            lines.append(f"{path}: unknown key; {hint}")
        else:
            msg = e["msg"].removeprefix("Value error, ")
            lines.append(f"{path or '(top level)'}: {msg}")
    return f"{source} is invalid: " + "; ".join(lines)


def parse_spec(data: Any, source: str, default_name: str | None = None) -> ModelSpec:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ModelSpecError(f"{source} must be a mapping of keys to values, e.g. 'backend: onnxruntime'.")
    if default_name is not None and "name" not in data:
        data = {**data, "name": default_name}
    try:
        return ModelSpec.model_validate(data)
    except ValidationError as err:
        raise ModelSpecError(format_validation_error(source, err)) from None


def find_spec_file(model_dir: Path) -> Path | None:
    for fn in SPEC_FILENAMES:
        p = model_dir / fn
        if p.is_file():
            return p
    return None


def load_spec_file(model_dir: Path, overrides: dict[str, Any] | None = None) -> ModelSpec:
    """Read a model folder's spec. A folder with no spec file gets defaults (ONNX, I/O from
    the graph) so a bare ``NAME/1/model.onnx`` serves as is."""
    return read_spec_path(find_spec_file(model_dir), model_dir.name, overrides,
                          default_source=model_dir / SPEC_FILENAMES[0])


def read_spec_path(path: Path | None, name: str, overrides: dict[str, Any] | None = None, *,
                   default_source: Path | None = None, name_from: str = "its folder") -> ModelSpec:
    """The spec in ``path`` (defaults when None) for the model called ``name``; a spec naming
    another model is refused (``name_from`` says where ``name`` came from, for the message)."""
    data: Any = {}
    source = str(path or default_source or SPEC_FILENAMES[0])
    if path is not None:
        source = str(path)
        try:
            text = path.read_text(encoding="utf-8")
            # a folder copied from a Triton repository: its config.pbtxt says what model.yaml would
            data = spec_from_pbtxt(text, source) if path.suffix == ".pbtxt" else yaml.safe_load(text)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ModelSpecError(f"{source} is not valid YAML{where}: {getattr(err, 'problem', err)}.") from None
        except (OSError, UnicodeDecodeError) as err:
            raise ModelSpecError(f"{source} cannot be read: {err}.") from None
    if overrides:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ModelSpecError(f"{source} must be a mapping of keys to values.")
        data = _deep_merge(data, overrides)
        source += " (with load-time overrides)"
    spec = parse_spec(data, source, default_name=name)
    if spec.name != name:
        raise ModelSpecError(
            f"{source}: name '{spec.name}' differs from {name_from} '{name}'; rename one so they match."
        )
    return spec


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out
