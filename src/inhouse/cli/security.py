"""``inhouse keys``, ``inhouse audit`` and ``inhouse encrypt``: security administration on the
server's data directory (no running server needed; a running server sees key changes at once)."""

from __future__ import annotations

import datetime as dt
import hashlib
import sys
import time
from pathlib import Path
from typing import Annotated

import orjson
import typer
import yaml

from inhouse.core.spec import find_spec_file
from inhouse.errors import ArtefactIntegrityError
from inhouse.security.audit import AuditLog
from inhouse.security.crypto import ModelKeyError, encrypt_file, key_id, new_key_file, read_key_file, write_atomic
from inhouse.security.keys import KeySpecError, KeyStore
from inhouse.security.secret import SecretError, load_or_create_secret
from inhouse.settings import SettingsError, load_settings

keys_app = typer.Typer(help="Create, list and revoke API keys.", no_args_is_help=True)
audit_app = typer.Typer(help="Verify and export the audit log.", no_args_is_help=True)

DataDirOpt = Annotated[Path | None, typer.Option(help="The server's data directory (key store, audit log).")]
ConfigOpt = Annotated[Path | None, typer.Option(help="Settings file (default: ./inhouse.yaml if present).")]


def _fail(msg: str, code: int = 1) -> typer.Exit:
    typer.echo(f"error: {msg}", err=True)
    return typer.Exit(code)


def _data_dir(data_dir: Path | None, config: Path | None) -> Path:
    try:
        return load_settings(config, data_dir=data_dir).data_dir
    except SettingsError as err:
        raise _fail(str(err), 2) from None


def _audit(data_dir: Path, create: bool = True) -> AuditLog:
    return AuditLog(data_dir, load_or_create_secret(data_dir, create=create), create=create)


def _parse_time(text: str) -> float:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        raise _fail(f"'{text}' is not a date or time; use ISO 8601, e.g. 2026-01-01 or 2026-01-01T08:00:00Z.",
                    2) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return when.timestamp()


def _parse_expiry(text: str) -> float:
    units = {"d": 86400, "h": 3600, "m": 60}
    if text[:-1].isdigit() and text[-1] in units:
        return time.time() + int(text[:-1]) * units[text[-1]]
    return _parse_time(text)


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Option(help="Who or what uses the key (e.g. risk-app).")],
    scopes: Annotated[str, typer.Option(help="Comma-separated: infer, admin, metrics.")] = "infer",
    models: Annotated[str | None, typer.Option(help="Comma-separated models it may use (default: all).")] = None,
    rate: Annotated[str | None, typer.Option(help="Rate limit, e.g. 200/s or 1000/min.")] = None,
    allow_ip: Annotated[list[str] | None, typer.Option(help="Allowed client address/CIDR (repeatable).")] = None,
    expires: Annotated[str | None, typer.Option(help="Expiry: 30d, 12h, or an ISO date.")] = None,
    data_dir: DataDirOpt = None, config: ConfigOpt = None,
) -> None:
    """Create a key. It is printed once and stored only as a keyed hash."""
    ddir = _data_dir(data_dir, config)
    try:
        store = KeyStore(ddir)
        key, rec = store.create(name, scopes.split(","), models=models.split(",") if models else None,
                                allow_ips=allow_ip or [], rate=rate,
                                expires_at=_parse_expiry(expires) if expires else None)
        store.close()
    except (KeySpecError, ValueError, SecretError) as err:
        raise _fail(str(err), 2) from None
    audit = _audit(ddir)
    audit.append_admin("keys.create", {"key_id": rec.key_id, "name": name, "scopes": sorted(rec.scopes)})
    audit.close()
    typer.echo(key)
    typer.echo(f"key id {rec.key_id}: store the key now; it cannot be shown again.", err=True)


@keys_app.command("list")
def keys_list(data_dir: DataDirOpt = None, config: ConfigOpt = None,
              json: Annotated[bool, typer.Option("--json", help="JSON lines.")] = False) -> None:
    """List keys (never the keys themselves)."""
    store = KeyStore(_data_dir(data_dir, config))
    rows = [k.public() for k in store.list()]
    store.close()
    if json:
        for r in rows:
            typer.echo(orjson.dumps(r).decode())
        return
    typer.echo(f"{'KEY ID':<17} {'NAME':<20} {'SCOPES':<20} {'STATUS':<8} {'MODELS':<20} RATE")
    for r in rows:
        models = ",".join(r["models"]) if r["models"] is not None else "*"  # type: ignore[arg-type]
        typer.echo(f"{r['key_id']:<17} {str(r['name'])[:20]:<20} {','.join(r['scopes']):<20} "  # type: ignore[arg-type]
                   f"{r['status']:<8} {models[:20]:<20} {r['rate'] or '-'}")


@keys_app.command("revoke")
def keys_revoke(key: Annotated[str, typer.Argument(help="Key id or name.")], data_dir: DataDirOpt = None,
                config: ConfigOpt = None) -> None:
    """Revoke a key; a running server refuses it from the next request on."""
    ddir = _data_dir(data_dir, config)
    store = KeyStore(ddir)
    ids = store.revoke(key)
    store.close()
    if not ids:
        raise _fail(f"No active key has id or name '{key}'.")
    audit = _audit(ddir)
    audit.append_admin("keys.revoke", {"key_ids": ids})
    audit.close()
    typer.echo(f"revoked {', '.join(ids)}")


@audit_app.command("verify")
def audit_verify(data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Prove that no entry was altered, removed, inserted or reordered."""
    ddir = _data_dir(data_dir, config)
    try:
        audit = _audit(ddir, create=False)
    except (FileNotFoundError, SecretError) as err:
        raise _fail(str(err)) from None
    report = audit.verify()
    audit.close()
    span = f"entries {report.first_seq}–{report.last_seq}" if report.entries else "no entries"
    if report.ok:
        typer.echo(f"OK: {report.entries} audit entries verified ({span}).")
        return
    for p in report.problems[:50]:
        typer.echo(f"TAMPERED: {p}", err=True)
    if len(report.problems) > 50:
        typer.echo(f"... and {len(report.problems) - 50} more problems", err=True)
    raise typer.Exit(3)


@audit_app.command("export")
def audit_export(since: Annotated[str | None, typer.Option(help="ISO date/time, e.g. 2026-01-01.")] = None,
                 format: Annotated[str, typer.Option(help="jsonl.")] = "jsonl",
                 output: Annotated[Path | None, typer.Option("--output", "-o", help="File (default: stdout).")] = None,
                 data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Export entries as JSON lines, chain hashes and HMACs included."""
    if format != "jsonl":
        raise _fail(f"Format '{format}' is not supported; use jsonl.", 2)
    ddir = _data_dir(data_dir, config)
    try:
        audit = _audit(ddir, create=False)
    except (FileNotFoundError, SecretError) as err:
        raise _fail(str(err)) from None
    since_ts = _parse_time(since) if since else None
    out = output.open("wb") if output else sys.stdout.buffer
    try:
        for row in audit.entries(since_ts):
            row["time"] = dt.datetime.fromtimestamp(row["ts"], dt.UTC).isoformat().replace("+00:00", "Z")
            out.write(orjson.dumps(row) + b"\n")
    finally:
        if output:
            out.close()
        audit.close()


@audit_app.command("prune")
def audit_prune(days: Annotated[float, typer.Option(help="Keep entries newer than this many days.")],
                data_dir: DataDirOpt = None, config: ConfigOpt = None) -> None:
    """Delete entries older than the retention period; the rest still verifies."""
    ddir = _data_dir(data_dir, config)
    audit = _audit(ddir, create=False)
    n = audit.prune(time.time() - days * 86400)
    audit.close()
    typer.echo(f"pruned {n} entries")


def encrypt(
    model_dir: Annotated[Path, typer.Argument(help="A model folder (MODEL/model.yaml, MODEL/1/...).")],
    key_file: Annotated[Path, typer.Option(help="The model key (32 bytes: raw, hex or base64).")],
    old_key_file: Annotated[list[Path] | None, typer.Option(help="Previous key(s), to rotate (repeatable).")] = None,
    new_key: Annotated[bool, typer.Option("--new-key", help="Create KEY_FILE with a fresh random key first.")] = False,
) -> None:
    """Encrypt a model's artefacts in place with AES-256-GCM (or rotate them to a new key).
    Every file is replaced atomically: a crash midway loses nothing, just run it again."""
    try:
        key = new_key_file(key_file) if new_key else read_key_file(key_file)
        old = {key_id(k): k for k in (read_key_file(p) for p in old_key_file or [])}
    except FileExistsError:
        raise _fail(f"{key_file} exists already; drop --new-key to use it.", 2) from None
    except ModelKeyError as err:
        raise _fail(str(err), 2) from None
    if not model_dir.is_dir():
        raise _fail(f"{model_dir} is not a folder.", 2)
    files = sorted(p for v in model_dir.iterdir() if v.is_dir() and v.name.isdigit()
                   for p in v.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise _fail(f"{model_dir} has no version folders with files to encrypt.", 2)
    counts: dict[str, int] = {}
    for f in files:
        try:
            done = encrypt_file(f, key, old)
        except ArtefactIntegrityError as err:
            raise _fail(f"{f}: {err.message}") from None
        counts[done] = counts.get(done, 0) + 1
    _update_spec(model_dir, key_id(key), files)
    typer.echo(f"{model_dir}: " + ", ".join(f"{n} {what}" for what, n in sorted(counts.items()))
               + f" (key id {key_id(key)})")


def _update_spec(model_dir: Path, kid: str, files: list[Path]) -> None:
    """Mark the model as encrypted (a plaintext replacement is then refused) and refresh listed
    checksums, which cover the stored (encrypted) bytes."""
    spec_file = find_spec_file(model_dir) or model_dir / "model.yaml"
    doc = (yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else None) or {"name": model_dir.name}
    doc["encryption"] = {"key_id": kid}
    sums = (doc.get("files") or {}).get("sha256") or {}
    for f in files:
        rel = f.relative_to(model_dir).as_posix()
        if rel in sums:
            sums[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    write_atomic(spec_file, yaml.safe_dump(doc, sort_keys=False).encode())
