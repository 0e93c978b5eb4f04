"""Model artefacts encrypted at rest: AES-256-GCM with a versioned header and a key id.

File layout (all integers big-endian)::

    b"INHENC" | version (1 byte, = 1) | key id length (1 byte) | key id (ASCII) | nonce (12 bytes) |
    ciphertext + 16-byte GCM tag

The header is authenticated as associated data, so a changed key id or version fails like a
flipped ciphertext byte. The server decrypts in memory only (``LoadContext.read_artefact``);
plaintext never touches the disk. The key id is a fingerprint of the key, so a folder half way
through a rotation is unambiguous and rotation simply runs again."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import tempfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from inhouse.core.spec import ModelSpec
from inhouse.errors import ArtefactIntegrityError

MAGIC = b"INHENC"
VERSION = 1
KEY_ENV = "INHOUSE_MODEL_KEY"


class ModelKeyError(ValueError):
    """A model key that cannot be used; the message says why."""


def key_id(key: bytes) -> str:
    return hmac.new(key, b"inhouse/model-key-id", hashlib.sha256).hexdigest()[:16]


def parse_key(text: str | bytes, where: str) -> bytes:
    """A 32-byte key given raw, as 64 hex digits or as base64."""
    raw = text if isinstance(text, bytes) else text.encode()
    stripped = raw.strip()
    for decode in (binascii.unhexlify, base64.b64decode, base64.urlsafe_b64decode):
        try:
            key = decode(stripped)
        except (binascii.Error, ValueError):
            continue
        if len(key) == 32:
            return key
    if len(raw) == 32:
        return raw
    raise ModelKeyError(f"{where} does not hold a 256-bit key: use 32 raw bytes, 64 hex digits or base64 "
                        "(make one with: inhouse encrypt --new-key FILE).")


def read_key_file(path: Path) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as err:
        raise ModelKeyError(f"Cannot read the model key file {path}: {err.strerror}.") from None
    return parse_key(data, str(path))


def new_key_file(path: Path) -> bytes:
    """Write a fresh random key (hex, mode 0600); refuses to overwrite."""
    key = secrets.token_bytes(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key.hex() + "\n")
    return key


def is_encrypted(data: bytes | memoryview) -> bool:
    return bytes(data[: len(MAGIC)]) == MAGIC


def encrypt(plaintext: bytes, key: bytes) -> bytes:
    kid = key_id(key).encode()
    header = MAGIC + bytes([VERSION, len(kid)]) + kid
    nonce = secrets.token_bytes(12)
    return header + nonce + AESGCM(key).encrypt(nonce, plaintext, header)


def _header(blob: bytes, what: str) -> tuple[str, int]:
    if not is_encrypted(blob) or len(blob) < len(MAGIC) + 2:
        raise ArtefactIntegrityError(f"{what} is not an inhouse-encrypted file.")
    version, n = blob[len(MAGIC)], blob[len(MAGIC) + 1]
    if version != VERSION:
        raise ArtefactIntegrityError(f"{what} uses encryption format version {version}; this inhouse reads "
                                     f"version {VERSION}. Upgrade inhouse.")
    end = len(MAGIC) + 2 + n
    try:
        kid = blob[len(MAGIC) + 2:end].decode("ascii")
    except UnicodeDecodeError:
        raise ArtefactIntegrityError(f"{what} has a damaged encryption header.") from None
    return kid, end


def decrypt(blob: bytes, keys: Mapping[str, bytes], what: str = "the artefact") -> bytes:
    """Authenticated decryption; any tampering or a wrong key is error 1004."""
    kid, end = _header(blob, what)
    key = keys.get(kid)
    if key is None:
        raise ArtefactIntegrityError(
            f"{what} is encrypted with key {kid}, which this server does not have (it has "
            f"{', '.join(sorted(keys)) or 'no model key'}); start it with --model-key-file pointing to that key.")
    if len(blob) < end + 12 + 16:
        raise ArtefactIntegrityError(f"{what} is truncated; restore it from backup.")
    nonce = blob[end:end + 12]
    try:
        return AESGCM(key).decrypt(nonce, blob[end + 12:], blob[:end])
    except InvalidTag:
        raise ArtefactIntegrityError(
            f"{what} failed decryption: the file was altered or damaged. Nothing was loaded; restore it "
            "from backup.") from None


class Keyring:
    """The model keys a server holds, by key id; it is the ``ArtefactDecryptor`` the model manager
    calls for every artefact read."""

    def __init__(self, keys: Iterable[bytes] = ()) -> None:
        self.keys = {key_id(k): k for k in keys}

    def __call__(self, data: bytes, relative: str, spec: ModelSpec) -> bytes:
        what = f"'{relative}' of model '{spec.name}'"
        if is_encrypted(data):
            return decrypt(data, self.keys, what)
        if spec.encryption is not None:
            raise ArtefactIntegrityError(
                f"{what} should be encrypted (model.yaml has 'encryption') but is plaintext; it may have been "
                "replaced. Re-encrypt it with: inhouse encrypt MODEL_DIR --key-file KEY.")
        return data


def read_model_file(path: Path, decryptor: Callable[[bytes, str, ModelSpec], bytes] | None,
                    spec: ModelSpec) -> bytes:
    """Bytes of any model file a backend reads itself (e.g. a safetensors shard of a Hugging Face
    folder: ``safetensors.torch.load(read_model_file(...))``), decrypted in memory when it is
    encrypted. Pass ``LoadContext.decryptor`` and ``LoadContext.spec``."""
    data = path.read_bytes()
    if decryptor is not None:
        return decryptor(data, path.name, spec)
    if is_encrypted(data):
        raise ArtefactIntegrityError(f"{path} is encrypted but this server has no model key; start it with "
                                     "--model-key-file.")
    return data


def _atomic_write(path: Path, data: bytes) -> None:
    """Write beside, fsync, rename over: a crash leaves the old file or the new one, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def encrypt_file(path: Path, key: bytes, old_keys: Mapping[str, bytes] | None = None) -> str:
    """Encrypt one file in place (or re-encrypt it under ``key``); returns what was done:
    'encrypted', 're-encrypted' or 'unchanged' (already under ``key``)."""
    data = path.read_bytes()
    if is_encrypted(data):
        kid, _ = _header(data, str(path))
        if kid == key_id(key):
            decrypt(data, {kid: key}, str(path))  # proves it is intact
            return "unchanged"
        plain = decrypt(data, {**(old_keys or {}), key_id(key): key}, str(path))
        _atomic_write(path, encrypt(plain, key))
        return "re-encrypted"
    _atomic_write(path, encrypt(data, key))
    return "encrypted"


def write_atomic(path: Path, data: bytes) -> None:
    _atomic_write(path, data)
