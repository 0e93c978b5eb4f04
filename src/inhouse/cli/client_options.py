"""Options every client command shares: server URL, API key, timeout, retries, TLS and the
client config file. Flags and ``INHOUSE_URL`` / ``INHOUSE_API_KEY`` override the file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from inhouse.client import ClientError
from inhouse.client_config import ClientConfig, load_client_config

Url = Annotated[str | None, typer.Option(help="Server URL [http://127.0.0.1:8000].", envvar="INHOUSE_URL")]
ApiKey = Annotated[str | None, typer.Option(help="API key.", envvar="INHOUSE_API_KEY")]
Timeout = Annotated[float | None, typer.Option(help="Seconds to wait for the server.")]
Retries = Annotated[int | None, typer.Option(help="Retries on 429 / 503, with back-off [3].")]
CaCert = Annotated[Path | None, typer.Option(help="CA certificate to trust (PEM), for a private CA.")]
ClientCert = Annotated[Path | None, typer.Option(help="Client certificate (PEM), for mutual TLS.")]
ClientKey = Annotated[Path | None, typer.Option(help="Client certificate key (PEM).")]
TlsVerify = Annotated[bool | None, typer.Option("--tls-verify/--no-tls-verify",
                                                help="Verify the server certificate [on].")]
ConfigFile = Annotated[Path | None, typer.Option(
    "--client-config", help="Client defaults file [~/.config/inhouse/client.yaml].",
    envvar="INHOUSE_CLIENT_CONFIG")]


def resolve(client_config: Path | None, **flags: Any) -> ClientConfig:
    try:
        return load_client_config(client_config, explicit=client_config is not None, **flags)
    except ClientError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(2) from None


def fail(err: Exception) -> typer.Exit:
    typer.echo(f"error: {err}", err=True)
    return typer.Exit(1)
