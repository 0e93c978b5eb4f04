"""Server settings, read once (CLI flags > ``INHOUSE_*`` environment > ``inhouse.yaml`` >
defaults) and then passed down. Nothing else in inhouse reads the environment."""

from __future__ import annotations

import ipaddress
import os
import sys
from pathlib import Path
from typing import Any, Literal

import platformdirs
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from inhouse.rates import parse_rate

DEFAULT_CONFIG_FILE = "inhouse.yaml"
AUTO_WORKERS_MAX = 8


def default_data_dir() -> Path:
    return Path(platformdirs.user_data_dir("inhouse", appauthor=False))


def cgroup_cpus(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> int | None:
    """The CPUs a container's quota allows (cgroup v2 ``cpu.max``, rounded up), or None without one:
    a pod limited to 2 CPUs on a 64-core node must not start one worker per node core."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, -(-int(quota) // int(period)))


def usable_cores() -> int:
    """The cores this process may run on: its affinity, within the container's quota."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, cgroup_cpus() or cores))


class GrpcSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = True
    max_workers: int = Field(default=16, ge=1)
    max_concurrent_rpcs: int | None = Field(default=None, ge=1)
    max_message_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    keepalive_time_s: float = Field(default=60.0, gt=0)
    keepalive_timeout_s: float = Field(default=20.0, gt=0)
    front: Literal["fast", "grpcio"] = Field(
        default="fast", description="fast: inhouse's own HTTP/2 front answers ModelInfer on the port and hands "
        "every other RPC to grpc.aio behind it; grpcio: grpc.aio serves the port itself (a fallback, should "
        "a client's HTTP/2 need what only grpc's C core does)")


class CacheSettings(BaseModel):
    """The response cache: which models (``enabled``, or each model's ``response_cache``), how
    long and how much, and where (memory, or Redis at ``redis_url``)."""

    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(default=False, description="cache every model's deterministic answers; a model's "
                          "response_cache.enabled overrides it")
    ttl_s: float = Field(default=300.0, gt=0)
    max_entries: int = Field(default=10_000, ge=1, description="in memory")
    max_bytes: int = Field(default=64 * 1024 * 1024, ge=1024, description="in memory")
    redis_url: str | None = Field(default=None, description="e.g. redis://cache:6379/0; unset: in memory")
    share_across_keys: bool = Field(default=False, description="let one API key's cached answer serve "
                                    "another key's identical request")
class RaySettings(BaseModel):
    """Ray Serve placement (``--ray``): models run as Ray Serve deployments, this process stays
    the front door."""

    model_config = ConfigDict(extra="forbid")

    address: str | None = Field(default=None, description="'auto', HOST:PORT or ray://HOST:PORT of a "
                                "running cluster; unset: start a local Ray for this server")
    namespace: str = Field(default="inhouse", min_length=1, description="Ray namespace of the deployments")
    num_cpus: int | None = Field(default=None, ge=1, description="CPUs of a local Ray (no address)")
    object_store_mb: int = Field(default=128, ge=64, description="object store of a local Ray, MiB")
    retries: int = Field(default=2, ge=0, le=10, description="times a request is sent again to another "
                         "replica when its replica died under it")


_GUIDE_SERVER_KEYS = ("host", "http_port", "grpc_port")


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INHOUSE_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    host: str = "127.0.0.1"
    http_port: int = Field(default=8000, ge=0, le=65535)
    grpc_port: int = Field(default=50051, ge=0, le=65535)
    repo: Path | None = Field(default=None, description="model repository; the demo repository if unset")
    model_path: Path | None = Field(default=None, description="serve this one model (a model folder, a version "
                                    "folder or an .onnx file) without a repository; env MODEL_PATH too")
    load: str = Field(default="all", description="'all', 'none' or a comma-separated list of models")
    poll: bool = False
    poll_interval_s: float = Field(default=2.0, gt=0)
    data_dir: Path = Field(default_factory=default_data_dir)
    max_request_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024, description="request line and headers; "
                                  "more gets 431 (code 2015)")
    header_timeout_s: float = Field(default=10.0, gt=0, description="an HTTP request's headers must arrive "
                                    "within this (also a new connection's first request); else 408 (code 2014)")
    body_timeout_s: float = Field(default=60.0, gt=0, description="an HTTP request's body must arrive within "
                                  "this after its headers; else 408 (code 2014)")
    gzip_min_bytes: int = Field(default=4096, ge=0, description="0 turns response compression off")
    drain_timeout_s: float = Field(default=30.0, ge=0)
    # one event loop uses one core: by default a front end per core (bench/README.md measures it)
    workers: int | Literal["auto"] = Field(default="auto", description="server processes sharing the ports; "
                                           f"'auto': one per core, at most {AUTO_WORKERS_MAX} (1 with ray, off "
                                           "Linux, and when every model loaded at start is held by one worker)")
    placement_one_above_mb: float = Field(default=16.0, gt=0, description="with workers above 1, a model "
                                          "whose files exceed this is held by one worker, with every core "
                                          "(model.yaml placement wins)")
    load_timeout_s: float | None = Field(default=None, gt=0, description="a model load (backend load and "
                                         "warm-up) running longer fails with 1009; a model's load.timeout_s wins")
    http_fast_path: bool = Field(default=True, description="answer v2 infer straight from the HTTP connection")
    onnx_spinning: bool = Field(default=False, description="let onnxruntime threads spin-wait")
    llama_server: Path | None = Field(default=None, description="llama.cpp's llama-server for backend: "
                                      "llamacpp (default: on PATH, else scripts/build_llama_server.sh's)")
    image_url_allow: list[str] = Field(default_factory=list, description="URL prefixes (scheme, host, path) "
                                       "of remote images chats may name; others answer 400 (data URLs always work)")
    vllm: Path | None = Field(default=None, description="vLLM's 'vllm' command for backend: vllm "
                              "(default: on PATH)")
    vllm_command: list[str] | None = Field(default=None, description="replaces 'vllm serve MODEL …' for "
                                           "backend: vllm (the listen address and key are still added): an "
                                           "OpenAI-compatible server to stand in, e.g. in tests")
    gc_freeze: bool = Field(default=True, description="freeze the long-lived heap after model loads so "
                            "full garbage collections do not stall the event loop")
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "text"] = "auto"
    # TLS (both transports)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    tls_min_version: Literal["1.2", "1.3"] = Field(default="1.2", description="lowest TLS version accepted; "
                                                   "1.3 is refused with grpc.front: grpcio (grpcio cannot enforce it)")

    @field_validator("tls_min_version", mode="before")
    @classmethod
    def _tls_version(cls, v: object) -> object:
        return str(v) if isinstance(v, float) else v  # YAML reads `tls_min_version: 1.3` as a number

    # access control
    auth: bool = False
    insecure: bool = False
    model_key_file: Path | None = None
    grpc: GrpcSettings = Field(default_factory=GrpcSettings)
    ray: RaySettings | None = Field(default=None, description="run models on Ray Serve (inhouse[ray])")

    # ---- scheduling ----

    # ---- LLM serving ----
    llm_stream_usage: bool = Field(default=True, description="end every OpenAI stream with a usage chunk, "
                                   "even when the client did not set stream_options.include_usage")
    llm_max_pending: int = Field(default=512, ge=1, description="requests per LLM (running and waiting) "
                                 "before new ones get 429 'rate limit'")
    llm_timeout_s: float | None = Field(default=None, gt=0, description="deadline for one generation request")
    cache: CacheSettings = Field(default_factory=CacheSettings)
    discovery: bool = Field(default=False, description="advertise this server on the LAN over mDNS/DNS-SD "
                            "(_inhouse._tcp); needs inhouse[discovery]")
    discovery_interfaces: list[str] = Field(default_factory=list, description="IPv4 addresses mDNS binds, e.g. "
                                            "[192.168.1.10]; empty: every interface")

    # ---- security ----
    allow_ips: list[str] = Field(default_factory=list, description="CIDR allow-list for every request but "
                                 "liveness and open readiness; empty: any address")
    trusted_proxies: list[str] = Field(default_factory=list, description="proxies whose X-Forwarded-For is believed")
    rate_limit_ip: str | None = Field(default=None, description="per client address, e.g. 100/s")
    rate_limit_key: str | None = Field(default=None, description="per API key without its own rate, e.g. 50/s")
    open_readiness: bool = Field(default=True, description="readiness checks (/v2/health/ready, /health, gRPC "
                                 "ServerReady and grpc.health.v1) answer without a key; false: the metrics scope")
    audit: bool | None = Field(default=None, description="audit log; unset: on when auth is on")
    audit_payloads: bool = Field(default=False, description="also record (PII-redacted) request bodies")
    audit_fsync: bool = Field(default=False, description="fsync every audit entry (survives power loss)")
    audit_retention_days: float | None = Field(default=None, gt=0, description="prune older entries")
    model_dirs: list[Path] = Field(default_factory=list, description="folders besides the repository that "
                                   "model artefacts may be read from")

    @field_validator("allow_ips", "trusted_proxies")
    @classmethod
    def _cidrs(cls, v: list[str]) -> list[str]:
        for item in v:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"'{item}' is not an IP address or CIDR network (e.g. 10.0.0.0/8)") from None
        return v

    @field_validator("rate_limit_ip", "rate_limit_key")
    @classmethod
    def _rate(cls, v: str | None) -> str | None:
        if v is not None:
            parse_rate(v)
        return v

    @model_validator(mode="before")
    @classmethod
    def _guide_server_keys(cls, data: Any) -> Any:
        """The deployment guides' ``service.yaml`` writes ``server: {host, http_port, grpc_port}``;
        a top-level key (a flag, INHOUSE_* or inhouse.yaml's own) wins over it."""
        if not isinstance(data, dict) or "server" not in data:
            return data
        server = data["server"]
        if not isinstance(server, dict):
            raise ValueError("server must be a mapping such as {http_port: 8000, grpc_port: 50051}")
        unknown = sorted(set(server) - set(_GUIDE_SERVER_KEYS))
        if unknown:
            raise ValueError(f"server.{unknown[0]} is not a setting; server may hold "
                             f"{', '.join(_GUIDE_SERVER_KEYS)}")
        rest = {k: v for k, v in data.items() if k != "server"}
        return {**server, **rest}

    def audit_enabled(self) -> bool:
        return self.auth if self.audit is None else self.audit

    # ---- observability ----
    metrics_port: int | None = Field(default=None, ge=0, le=65535,
                                     description="also serve /metrics on this port (e.g. 9091)")
    metrics_host: str | None = Field(default=None, description="address of the metrics port (default: host)")
    access_log: bool = Field(default=True, description="one log line per HTTP / gRPC request")
    access_log_sample: float = Field(default=1.0, ge=0.0, le=1.0,
                                     description="share of successful requests given an access-log line "
                                                 "(errors and refusals always get one)")
    log_client_address: bool = Field(default=False, description="put the client IP in access logs")
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP collector, e.g. http://otel:4318")
    otel_service_name: str = "inhouse"
    trace_sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)

    # ---- tooling / deployment ----

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if settings_cls.model_config.get("yaml_file"):
            sources.append(YamlConfigSettingsSource(settings_cls))
        return tuple(sources)

    @field_validator("workers")
    @classmethod
    def _workers(cls, v: int | str) -> int | str:
        if isinstance(v, int) and v < 1:
            raise ValueError("workers must be 1 or more, or 'auto' (one per core)")
        return v

    @model_validator(mode="after")
    def _ray_in_one_process(self) -> ServerSettings:
        # each worker would deploy the same Ray Serve applications: Ray scales those models itself
        if self.ray is not None and self.workers not in (1, "auto"):
            raise ValueError("ray and workers above 1 do not go together: models on Ray Serve scale with their "
                             "replicas; keep workers: 1 with --ray")
        return self

    def worker_count(self) -> int:
        """Processes to run: ``workers``, or one per core this process may use, up to the limit."""
        if self.workers != "auto":
            return int(self.workers)
        # Ray Serve scales its models with replicas; elsewhere SO_REUSEPORT does not spread connections
        if self.ray is not None or not sys.platform.startswith("linux"):
            return 1
        return min(usable_cores(), AUTO_WORKERS_MAX)

    def load_names(self) -> list[str] | Literal["all", "none"]:
        value = self.load.strip()
        if value in ("all", "none", ""):
            return "none" if value in ("none", "") else "all"
        return [n.strip() for n in value.split(",") if n.strip()]


class SettingsError(Exception):
    """Settings that cannot be used; the message says which and why."""


def load_settings(config: Path | None = None, **overrides: Any) -> ServerSettings:
    """Build the settings. ``overrides`` are CLI flags the user actually gave."""
    if config is None:
        env_cfg = os.environ.get("INHOUSE_CONFIG")
        if env_cfg:
            config = Path(env_cfg)
        elif Path(DEFAULT_CONFIG_FILE).is_file():
            config = Path(DEFAULT_CONFIG_FILE)
    if config is not None and not config.is_file():
        raise SettingsError(f"Config file {config} does not exist.")
    if config is not None:
        _check_yaml(config)
    # containers built for the deployment guides set MODEL_PATH; INHOUSE_MODEL_PATH and --model win,
    # and an explicit --repo too: MODEL_PATH is a common name that other tools set for their own use
    if overrides.get("model_path") is None and overrides.get("repo") is None \
            and "INHOUSE_MODEL_PATH" not in os.environ and os.environ.get("MODEL_PATH"):
        overrides["model_path"] = Path(os.environ["MODEL_PATH"])
    cls: type[ServerSettings] = ServerSettings
    if config is not None:
        cls = type("ServerSettingsFromFile", (ServerSettings,), {
            "model_config": SettingsConfigDict(**{**ServerSettings.model_config, "yaml_file": config}),
        })
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as err:
        where = f" (from {config}, INHOUSE_* environment or flags)" if config else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'config'}: "
            f"{'unknown setting' if e['type'] == 'extra_forbidden' else e['msg']}"
            for e in err.errors()
        )
        raise SettingsError(f"Invalid settings{where}: {problems}.") from None
    except Exception as err:  # a YAML syntax error surfaces from the yaml source
        raise SettingsError(f"Cannot read settings from {config}: {err}") from None


def _check_yaml(config: Path) -> None:
    """A settings file that is not a YAML mapping gets a one-line error naming the spot."""
    import yaml

    try:
        doc = yaml.safe_load(config.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise SettingsError(f"Settings file {config} is not valid YAML{where}: "
                            f"{getattr(err, 'problem', None) or 'syntax error'}.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SettingsError(f"Cannot read settings file {config}: {err}.") from None
    if doc is not None and not isinstance(doc, dict):
        raise SettingsError(f"Settings file {config} must be a mapping of setting names to values, "
                            "e.g. 'http_port: 8000'.")
