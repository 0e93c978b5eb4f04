"""Doctor checks for the security stores in the data directory: the API key store and the
hash-chained audit log (the same verification as ``inhouse audit verify``)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator

from inhouse.doctor.findings import DoctorOptions, Finding, Severity, register_check
from inhouse.security.audit import AUDIT_DB, AuditLog
from inhouse.security.keys import KEYS_DB, KeyStore
from inhouse.security.secret import SecretError, load_or_create_secret


def check_key_store(o: DoctorOptions) -> Iterator[Finding]:
    s = o.settings
    path = s.data_dir / KEYS_DB
    if not path.exists():
        if s.auth:
            yield Finding("keys", Severity.ERROR, f"--auth is on but there is no key store ({path}): every "
                          "request will be refused.", "Create a key: inhouse keys create --name NAME --scopes infer")
        else:
            yield Finding("keys", Severity.INFO, "No API key store yet (auth is off).")
        return
    try:
        store = KeyStore(s.data_dir, load_or_create_secret(s.data_dir, create=False))
        try:
            keys = store.list()
        finally:
            store.close()
    except (SecretError, sqlite3.Error) as err:
        yield Finding("keys", Severity.ERROR, f"The key store {path} cannot be read: {err}",
                      "Restore the data directory from backup, or move it aside and create new keys.")
        return
    now = time.time()
    active = [k for k in keys if not k.revoked_at and (k.expires_at is None or k.expires_at > now)]
    soon = [k.name for k in active if k.expires_at is not None and k.expires_at - now < 7 * 86400]
    if s.auth and not active:
        yield Finding("keys", Severity.ERROR, f"--auth is on but none of the {len(keys)} key(s) is active.",
                      "Create a key: inhouse keys create --name NAME --scopes infer")
    else:
        yield Finding("keys", Severity.OK, f"Key store readable: {len(active)} active of {len(keys)} key(s).")
    if soon:
        yield Finding("keys", Severity.WARNING, f"Key(s) expiring within 7 days: {', '.join(soon)}.",
                      "Create replacements and hand them out before they expire.")


def check_audit_chain(o: DoctorOptions) -> Iterator[Finding]:
    s = o.settings
    path = s.data_dir / AUDIT_DB
    if not path.exists():
        yield Finding("audit", Severity.INFO, "No audit log yet; it is created when the server first records.")
        return
    try:
        log = AuditLog(s.data_dir, create=False)
        try:
            report = log.verify()
        finally:
            log.close()
    except (SecretError, sqlite3.Error, FileNotFoundError) as err:
        yield Finding("audit", Severity.ERROR, f"The audit log {path} cannot be verified: {err}",
                      "Keep the damaged file for investigation; restore the data directory from backup.")
        return
    if report.ok:
        yield Finding("audit", Severity.OK, f"Audit chain verifies: {report.entries} entries intact.")
    else:
        shown = "; ".join(report.problems[:3]) + (" …" if len(report.problems) > 3 else "")
        yield Finding("audit", Severity.ERROR, f"Audit chain broken: {shown}",
                      "Entries were altered, removed or reordered. Keep the file as evidence; "
                      "'inhouse audit verify' lists every problem.")


register_check("keys", check_key_store)
register_check("audit", check_audit_chain)
