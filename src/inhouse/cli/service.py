"""``inhouse install-service``: run inhouse under systemd as a dedicated user."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from inhouse.errors import InhouseError
from inhouse.tools.systemd import ServiceOptions, install, render_unit


def install_service(
    name: Annotated[str, typer.Option(help="Unit name.")] = "inhouse",
    user: Annotated[str, typer.Option(help="System user the server runs as (created if missing).")] = "inhouse",
    config: Annotated[Path, typer.Option(help="Settings file the service reads (written if missing).")] = Path(
        "/etc/inhouse/inhouse.yaml"),
    repo: Annotated[Path, typer.Option(help="Model repository.")] = Path("/var/lib/inhouse/models"),
    data_dir: Annotated[Path, typer.Option(help="Key store, audit log.")] = Path("/var/lib/inhouse"),
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "0.0.0.0",
    http_port: Annotated[int, typer.Option(help="REST port.")] = 8000,
    grpc_port: Annotated[int, typer.Option(help="gRPC port.")] = 50051,
    auth: Annotated[bool, typer.Option("--auth/--no-auth", help="Require API keys (create them with "
                                       "'inhouse keys create --data-dir DATA_DIR').")] = True,
    insecure: Annotated[bool, typer.Option("--insecure", help="Serve a non-loopback address without auth.")] = False,
    drain_timeout: Annotated[float, typer.Option(help="Seconds in-flight requests get to finish on stop.")] = 30.0,
    gpu: Annotated[bool, typer.Option("--gpu", help="Let the service see GPU devices.")] = False,
    unit_dir: Annotated[Path, typer.Option(help="Where to write the unit.")] = Path("/etc/systemd/system"),
    start: Annotated[bool, typer.Option("--start/--no-start", help="Enable and start it now.")] = True,
    print_unit: Annotated[bool, typer.Option("--print", help="Only print the unit; change nothing.")] = False,
) -> None:
    """Install a hardened systemd service (dedicated user, Restart=always, graceful stop)."""
    opts = ServiceOptions(name=name, user=user, config=config, repo=repo, data_dir=data_dir, host=host,
                          http_port=http_port, grpc_port=grpc_port, drain_timeout_s=drain_timeout, gpu=gpu,
                          auth=auth, insecure=insecure)
    if print_unit:
        typer.echo(render_unit(opts), nl=False)
        return
    try:
        for line in install(opts, unit_dir, start=start):
            typer.echo(line)
    except (InhouseError, OSError) as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(1) from None
