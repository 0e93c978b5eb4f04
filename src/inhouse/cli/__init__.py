"""The ``inhouse`` command line. Each command group lives in its own module."""

from __future__ import annotations

import typer

from inhouse import __version__
from inhouse.cli import chat, convert, discover, doctor, infer, models, security, serve, service

app = typer.Typer(
    name="inhouse",
    help="Self-hosted inference server for private AI deployments.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.command("serve")(serve.serve)
app.add_typer(models.app, name="models")
# ---- command groups added by other modules register below, one line each ----

# security:
app.add_typer(security.keys_app, name="keys")
app.add_typer(security.audit_app, name="audit")
app.command("encrypt")(security.encrypt)

# observability:
app.command("doctor")(doctor.doctor)

# tooling:
app.command("convert")(convert.convert)
app.command("quantize")(convert.quantize)
app.command("infer")(infer.infer)
app.command("chat")(chat.chat)
app.command("install-service")(service.install_service)

# LAN discovery:
app.command("discover")(discover.discover_command)



@app.command("version")
def version() -> None:
    """Print the inhouse version."""
    typer.echo(__version__)


def main() -> None:
    app()
