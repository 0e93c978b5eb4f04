"""``inhouse doctor``: a table of findings with the fix for each; exit 1 on errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import orjson
import typer
from rich.console import Console
from rich.table import Table

from inhouse.doctor import DoctorOptions, Finding, Severity, run_checks, worst
from inhouse.settings import ServerSettings, SettingsError, load_settings

_STYLE = {Severity.OK: "green", Severity.INFO: "cyan", Severity.WARNING: "yellow", Severity.ERROR: "bold red"}


def render(findings: list[Finding], console: Console, *, problems_only: bool = False) -> None:
    rows = [f for f in findings if f.severity >= Severity.WARNING] if problems_only else findings
    table = Table(show_lines=False, expand=False)
    table.add_column("", no_wrap=True)
    table.add_column("check", no_wrap=True)
    table.add_column("finding", overflow="fold")
    table.add_column("how to fix", overflow="fold")
    for f in sorted(rows, key=lambda f: -f.severity) if problems_only else rows:
        table.add_row(f"[{_STYLE[f.severity]}]{f.severity.name}[/]", f.area, f.message, f.fix)
    console.print(table)
    errors = sum(f.severity == Severity.ERROR for f in findings)
    warnings = sum(f.severity == Severity.WARNING for f in findings)
    console.print(f"{errors} error(s), {warnings} warning(s).")


def diagnose(settings: ServerSettings, console: Console | None = None, *, check_ports: bool = True) -> Severity:
    """Print the problems (warnings and errors) only; used when ``inhouse serve`` cannot start."""
    findings = run_checks(DoctorOptions(settings=settings, repo=settings.repo, check_ports=check_ports))
    if worst(findings) >= Severity.WARNING:
        render(findings, console or Console(stderr=True), problems_only=True)
    return worst(findings)


def doctor(
    repo: Annotated[Path | None, typer.Option(help="Model repository to check (default: from settings).")] = None,
    config: Annotated[Path | None, typer.Option(help="Settings file (default: ./inhouse.yaml if present).")] = None,
    host: Annotated[str | None, typer.Option(help="Address the server will listen on.")] = None,
    http_port: Annotated[int | None, typer.Option(help="REST port to check.")] = None,
    grpc_port: Annotated[int | None, typer.Option(help="gRPC port to check.")] = None,
    metrics_port: Annotated[int | None, typer.Option(help="Dedicated metrics port to check.")] = None,
    tls_cert: Annotated[Path | None, typer.Option(help="TLS certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="TLS private key (PEM).")] = None,
    tls_client_ca: Annotated[Path | None, typer.Option(help="CA for client certificates.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Key store, audit log and demo repository.")] = None,
    load: Annotated[bool, typer.Option("--load/--no-load", help="Also load every model (slow, thorough).")] = False,
    ports: Annotated[bool, typer.Option("--ports/--no-ports", help="Check that the ports are free.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print findings as JSON.")] = False,
) -> None:
    """Check settings, model specs and files, providers and GPUs, ports, disk, TLS; say how to fix
    what is wrong. Exits 1 if anything is an error."""
    console = Console(stderr=False, soft_wrap=False)
    try:
        settings = load_settings(config, repo=repo, host=host, http_port=http_port, grpc_port=grpc_port,
                                 metrics_port=metrics_port, tls_cert=tls_cert, tls_key=tls_key,
                                 tls_client_ca=tls_client_ca, data_dir=data_dir)
    except SettingsError as err:
        findings = [Finding("config", Severity.ERROR, str(err),
                            "Fix the setting named above (flags, INHOUSE_* environment or the config file).")]
    else:
        findings = run_checks(DoctorOptions(settings=settings, repo=settings.repo, load_models=load,
                                            check_ports=ports))
    if json_out:
        typer.echo(orjson.dumps([{"severity": f.severity.name.lower(), "check": f.area, "finding": f.message,
                                  "fix": f.fix} for f in findings], option=orjson.OPT_INDENT_2).decode())
    else:
        render(findings, console)
    if worst(findings) >= Severity.ERROR:
        raise typer.Exit(1)
