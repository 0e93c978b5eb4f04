"""``inhouse models list|load|unload``: manage a running server's models."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from inhouse.cli.client_options import (
    ApiKey,
    CaCert,
    ClientCert,
    ClientKey,
    ConfigFile,
    Retries,
    Timeout,
    TlsVerify,
    Url,
    fail,
    resolve,
)
from inhouse.client import ClientError

app = typer.Typer(help="List, load and unload models on a running server.", no_args_is_help=True)


@app.command("list")
def list_models(url: Url = None, api_key: ApiKey = None, timeout: Timeout = None, retries: Retries = None,
                ca_cert: CaCert = None, client_cert: ClientCert = None, client_key: ClientKey = None,
                tls_verify: TlsVerify = None, client_config: ConfigFile = None) -> None:
    """Show every model in the repository with its versions and state."""
    cfg = resolve(client_config, url=url, api_key=api_key, timeout=timeout, retries=retries, ca_cert=ca_cert,
                  client_cert=client_cert, client_key=client_key, tls_verify=tls_verify)
    try:
        with cfg.client() as c:
            rows = c.repository_index()
    except ClientError as err:
        raise fail(err) from None
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
def load(name: str, url: Url = None, api_key: ApiKey = None, timeout: Timeout = 300.0, retries: Retries = None,
         ca_cert: CaCert = None, client_cert: ClientCert = None, client_key: ClientKey = None,
         tls_verify: TlsVerify = None, client_config: ConfigFile = None,
         config: Annotated[str | None, typer.Option(
             help="Keys merged over model.yaml for this load: inline JSON, or @FILE (JSON or YAML).")] = None,
         ) -> None:
    """Load a model (or reload it after its files changed)."""
    cfg = resolve(client_config, url=url, api_key=api_key, timeout=timeout, retries=retries, ca_cert=ca_cert,
                  client_cert=client_cert, client_key=client_key, tls_verify=tls_verify)
    try:
        override = _config_override(config)
        with cfg.client() as c:
            res = c.load(name, override)
    except ClientError as err:
        raise fail(err) from None
    typer.echo(f"{name}: READY (versions {', '.join((res or {}).get('versions', []))})")


@app.command("unload")
def unload(name: str, url: Url = None, api_key: ApiKey = None, timeout: Timeout = 120.0, retries: Retries = None,
           ca_cert: CaCert = None, client_cert: ClientCert = None, client_key: ClientKey = None,
           tls_verify: TlsVerify = None, client_config: ConfigFile = None) -> None:
    """Unload a model; in-flight requests finish first."""
    cfg = resolve(client_config, url=url, api_key=api_key, timeout=timeout, retries=retries, ca_cert=ca_cert,
                  client_cert=client_cert, client_key=client_key, tls_verify=tls_verify)
    try:
        with cfg.client() as c:
            c.unload(name)
    except ClientError as err:
        raise fail(err) from None
    typer.echo(f"{name}: UNLOADED")
