"""``inhouse serve``."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from inhouse.cli.doctor import diagnose
from inhouse.logs import configure_logging
from inhouse.settings import SettingsError, load_settings

log = logging.getLogger("inhouse")


def serve(
    repo: Annotated[Path | None, typer.Option(help="Model repository folder (default: the built-in demo).")] = None,
    model: Annotated[Path | None, typer.Option(
        help="Serve one model (folder or .onnx file) without a repository; env MODEL_PATH.")] = None,
    config: Annotated[Path | None, typer.Option(help="Settings file (default: ./inhouse.yaml if present).")] = None,
    host: Annotated[str | None, typer.Option(help="Address to listen on [127.0.0.1].")] = None,
    http_port: Annotated[int | None, typer.Option(help="REST port [8000].")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port [50051].")] = None,
    load: Annotated[str | None, typer.Option(help="Models to load at start: all | none | NAME,NAME.")] = None,
    poll: Annotated[bool | None, typer.Option("--poll/--no-poll", help="Follow repository changes.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="CA for client certificates (mutual TLS).")] = None,
    tls_min_version: Annotated[str | None, typer.Option(help="Lowest TLS version accepted: 1.2 | 1.3 [1.2].")] = None,
    auth: Annotated[bool | None, typer.Option("--auth/--no-auth", help="Require API keys.")] = None,
    insecure: Annotated[
        bool | None, typer.Option("--insecure", help="Allow a non-loopback address without auth.")
    ] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Key store, audit log and demo repository.")] = None,
    model_key_file: Annotated[Path | None, typer.Option(help="Key for models encrypted at rest.")] = None,
    log_level: Annotated[str | None, typer.Option(help="debug | info | warning | error.")] = None,
    log_format: Annotated[str | None, typer.Option(help="auto | json | text.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Also serve /metrics on this port (e.g. 9091).")] = None,
    access_log: Annotated[
        bool | None, typer.Option("--access-log/--no-access-log", help="One log line per request.")
    ] = None,
    otlp_endpoint: Annotated[
        str | None, typer.Option(help="Export traces over OTLP/HTTP to this collector (needs the otel extra).")
    ] = None,
    # LLM serving
    llm_stream_usage: Annotated[bool | None, typer.Option(
        "--llm-stream-usage/--no-llm-stream-usage",
        help="End OpenAI streams with a usage chunk unless the client opts out [on].")] = None,
    llm_max_pending: Annotated[int | None, typer.Option(
        help="Requests per LLM, running and waiting, before 429 'rate limit' [512].")] = None,
    llm_timeout_s: Annotated[float | None, typer.Option(help="Deadline for one generation, seconds.")] = None,
    load_timeout: Annotated[float | None, typer.Option(
        help="Seconds a model load (with warm-up) may take before it fails with 1009 [no limit].")] = None,
    advertise: Annotated[bool | None, typer.Option(
        "--advertise/--no-advertise",
        help="Announce this server on the LAN over mDNS (_inhouse._tcp; needs inhouse[discovery]).")] = None,
    workers: Annotated[str | None, typer.Option(
        help="Server processes sharing the ports: N | auto (one per core, at most 8; 1 with --ray) [1].")] = None,
    ray: Annotated[str | None, typer.Option(
        help="Run models as Ray Serve deployments: local (start a Ray), auto, or a cluster's HOST:PORT "
             "(needs inhouse[ray]).")] = None,
) -> None:
    """Start the server: KServe v2 REST (and gRPC), OpenAI- and Anthropic-compatible APIs."""
    try:
        settings = load_settings(
            config, repo=repo, model_path=model, host=host, http_port=http_port, grpc_port=grpc_port, load=load,
            poll=poll,
            tls_cert=tls_cert, tls_key=tls_key, tls_client_ca=tls_client_ca, auth=auth, insecure=insecure,
            tls_min_version=tls_min_version,
            data_dir=data_dir, model_key_file=model_key_file, log_level=log_level, log_format=log_format,
            metrics_port=metrics_port, access_log=access_log, otlp_endpoint=otlp_endpoint,
            llm_stream_usage=llm_stream_usage, llm_max_pending=llm_max_pending, llm_timeout_s=llm_timeout_s,
            load_timeout_s=load_timeout, discovery=advertise, workers=workers,
            ray=None if ray is None else {"address": None if ray == "local" else ray},
        )
    except SettingsError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None
    configure_logging(settings.log_level, settings.log_format)
    from inhouse.workers.placement import start_count

    count = start_count(settings)
    if count > 1:
        from inhouse.workers.supervisor import run_workers

        raise typer.Exit(run_workers(settings, count))
    # lazy: the server pulls in the web stack and every backend; other commands start without it
    from inhouse.server import InhouseServer, StartupError

    async def _main() -> None:
        server = InhouseServer(settings)
        await server.run()

    try:
        _run(_main())
    except StartupError as err:
        typer.echo(f"error: {err}", err=True)
        diagnose(settings)  # the same findings and fixes as `inhouse doctor`
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


def _run(coro: object) -> None:
    try:
        import uvloop

        uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:
        asyncio.run(coro)  # type: ignore[arg-type]
