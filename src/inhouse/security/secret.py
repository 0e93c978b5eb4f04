"""The server secret: 32 random bytes in ``DATA_DIR/secret.key`` (mode 0600), created on first
use. API keys are stored as an HMAC under a key derived from it, and audit entries are
authenticated with another. Whoever can read it can forge audit entries: keep the data
directory readable by the server's user only."""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from pathlib import Path

SECRET_FILE = "secret.key"  # noqa: S105 - a file name, not a secret


class SecretError(Exception):
    """The server secret cannot be read or created; the message says why."""


def load_or_create_secret(data_dir: Path, *, create: bool = True) -> bytes:
    path = data_dir / SECRET_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if not create:
            raise SecretError(f"{path} does not exist: no key store or audit log was created in {data_dir} "
                              "(use the same --data-dir as the server).") from None
        data_dir.mkdir(parents=True, exist_ok=True)
        raw = secrets.token_bytes(32)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process created it first: use theirs
            return load_or_create_secret(data_dir, create=False)
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        raise SecretError(f"Cannot read the server secret {path}: {err.strerror}.") from None
    if len(raw) != 32:
        raise SecretError(f"{path} is damaged (expected 32 bytes, found {len(raw)}); restore it from backup.")
    return raw


def derive(secret: bytes, purpose: str) -> bytes:
    """An independent sub-key for one purpose (domain separation)."""
    return hmac.new(secret, b"inhouse/" + purpose.encode(), hashlib.sha256).digest()
