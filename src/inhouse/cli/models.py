"""``inhouse models list|load|unload``: manage a running server's models."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from inhouse.client import ClientError, InhouseClient

app = typer.Typer(help="List, load and unload models on a running server.", no_args_is_help=True)

UrlOpt = Annotated[str, typer.Option(help="Server URL.", envvar="INHOUSE_URL")]
KeyOpt = Annotated[str | None, typer.Option(help="API key.", envvar="INHOUSE_API_KEY")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds to wait for the server.")]


def _client(url: str, api_key: str | None, timeout: float) -> InhouseClient:
    return InhouseClient(url, api_key=api_key or os.environ.get("INHOUSE_API_KEY"), timeout=timeout)


@app.command("list")
def list_models(url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None, timeout: TimeoutOpt = 30.0) -> None:
    """Show every model in the repository with its versions and state."""
    try:
        with _client(url, api_key, timeout) as c:
            rows = c.repository_index()
    except ClientError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{'MODEL':<28} {'VERSION':<8} {'STATE':<10} REASON")
    for r in rows:
        typer.echo(f"{r['name']:<28} {r.get('version', '-'):<8} {r['state']:<10} {r.get('reason', '')}")


@app.command("load")
def load(name: str, url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None,
         timeout: TimeoutOpt = 300.0) -> None:
    """Load a model (or reload it after its files changed)."""
    try:
        with _client(url, api_key, timeout) as c:
            res = c.load(name)
    except ClientError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name}: READY (versions {', '.join(res.get('versions', []))})")


@app.command("unload")
def unload(name: str, url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None,
           timeout: TimeoutOpt = 120.0) -> None:
    """Unload a model; in-flight requests finish first."""
    try:
        with _client(url, api_key, timeout) as c:
            c.unload(name)
    except ClientError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"{name}: UNLOADED")
