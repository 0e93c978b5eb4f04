"""``inhouse discover``: the inhouse servers announcing themselves on the LAN (mDNS)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated

import typer

from inhouse.discovery import DiscoveryUnavailableError, as_dicts, discover


def discover_command(
    timeout: Annotated[float, typer.Option(help="Seconds to listen for answers.", min=0.1, max=60)] = 3.0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON array, for scripts.")] = False,
    interface: Annotated[list[str] | None, typer.Option(
        help="Listen on this IPv4 address only (repeatable; default: every interface).")] = None,
) -> None:
    """List inhouse servers on the LAN: URL, TLS, whether an API key is needed."""
    try:
        found = asyncio.run(discover(timeout, interface or None))
    except DiscoveryUnavailableError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(as_dicts(found)))
        return
    if not found:
        typer.echo(f"No inhouse servers answered within {timeout:g} s.")
        return
    for a in found:
        grpc = f"  grpc :{a.grpc}" if a.grpc else ""
        typer.echo(f"{a.url}  tls={'yes' if a.tls else 'no'}  key={'needed' if a.auth else 'not needed'}"
                   f"{grpc}  v{a.version}  ({a.name})")
