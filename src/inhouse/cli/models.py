"""``inhouse models list|load|unload``: manage a running server's models."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

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


def _config_override(value: str | None) -> dict[str, Any] | None:
    """``--config`` as inline JSON, or ``@FILE`` holding JSON or YAML."""
    if value is None:
        return None
    text, source = value, "--config"
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            text, source = path.read_text(encoding="utf-8"), str(path)
        except OSError as err:
            raise ClientError(f"Cannot read {path}: {err.strerror}.") from None
    try:
        doc = yaml.safe_load(text)  # YAML is a superset of JSON
    except yaml.YAMLError:
        raise ClientError(f"{source} is not valid JSON or YAML.") from None
    if not isinstance(doc, dict):
        raise ClientError(f"{source} must be a mapping of model.yaml keys, e.g. '{{\"warmup\": {{\"samples\": 2}}}}'.")
    return doc


@app.command("load")
def load(name: str, url: UrlOpt = "http://127.0.0.1:8000", api_key: KeyOpt = None,
         timeout: TimeoutOpt = 300.0,
         config: Annotated[str | None, typer.Option(
             help="Keys merged over model.yaml for this load: inline JSON, or @FILE (JSON or YAML).")] = None,
         ) -> None:
    """Load a model (or reload it after its files changed)."""
    try:
        override = _config_override(config)
        with _client(url, api_key, timeout) as c:
            res = c.load(name, override)
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
