"""The ``inhouse`` command line. Each command group lives in its own module."""

from __future__ import annotations

import typer

from inhouse import __version__
from inhouse.cli import chat, convert, doctor, infer, models, serve, service

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

# security (issue 6):
from inhouse.cli import security as _security  # noqa: E402

app.add_typer(_security.keys_app, name="keys")
app.add_typer(_security.audit_app, name="audit")
app.command("encrypt")(_security.encrypt)

# observability (issue 7):
app.command("doctor")(doctor.doctor)

# tooling (issue 8):
app.command("convert")(convert.convert)
app.command("quantize")(convert.quantize)
app.command("infer")(infer.infer)
app.command("chat")(chat.chat)
app.command("install-service")(service.install_service)



@app.command("version")
def version() -> None:
    """Print the inhouse version."""
    typer.echo(__version__)


def main() -> None:
    app()
