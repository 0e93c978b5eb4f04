"""TLS and mutual TLS for both transports, from one set of settings (tls_cert, tls_key,
tls_client_ca). Files are read and checked once at start, so a missing file or a key that
does not match its certificate stops the server with a clear message instead of failing on
the first handshake."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from inhouse.settings import ServerSettings

MIN_TLS_VERSION = ssl.TLSVersion.TLSv1_2  # TLS 1.3 is negotiated whenever the client offers it
_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


class TlsConfigError(Exception):
    """TLS settings that cannot be used; the message says which file and what to do."""


@dataclass(frozen=True)
class TlsMaterial:
    cert_path: Path
    key_path: Path
    client_ca_path: Path | None
    cert_chain: bytes
    private_key: bytes
    client_ca: bytes | None
    min_version: ssl.TLSVersion = MIN_TLS_VERSION

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


def _read(path: Path, what: str, flag: str) -> bytes:
    if not path.is_file():
        raise TlsConfigError(f"The {what} file {path} ({flag}) does not exist or is not a file.")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise TlsConfigError(f"Cannot read the {what} file {path} ({flag}): {err.strerror}.") from None
    if b"-----BEGIN " not in data:
        raise TlsConfigError(f"The {what} file {path} ({flag}) is not PEM; convert it to PEM.")
    return data


def _no_password() -> bytes:
    raise TlsConfigError("needs a password")


def load_tls(settings: ServerSettings) -> TlsMaterial | None:
    """The validated TLS material, or None when TLS is off. Raises TlsConfigError."""
    cert, key, ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if ca is not None:
            raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS runs over TLS.")
        return None
    if cert is None or key is None:
        raise TlsConfigError("TLS needs both --tls-cert and --tls-key (PEM files); only one was given.")
    material = TlsMaterial(
        cert_path=cert, key_path=key, client_ca_path=ca,
        cert_chain=_read(cert, "TLS certificate", "--tls-cert"),
        private_key=_read(key, "TLS private key", "--tls-key"),
        client_ca=_read(ca, "client CA", "--tls-client-ca") if ca is not None else None,
        min_version=_VERSIONS[settings.tls_min_version],
    )
    if material.min_version > MIN_TLS_VERSION and settings.grpc.enabled and settings.grpc.front == "grpcio":
        # grpcio's ssl_server_credentials takes no TLS version: gRPC would still accept 1.2 (the
        # HTTP/2 front terminates TLS with server_context below, which does keep the minimum)
        raise TlsConfigError(
            f"tls_min_version {settings.tls_min_version} cannot be enforced with grpc.front: grpcio: grpcio's "
            "server credentials accept TLS 1.2 and 1.3 and have no minimum to set. Use grpc.front: fast (the "
            "default), turn gRPC off (grpc.enabled: false), or keep tls_min_version at 1.2."
        )
    server_context(material)  # fails here, at start, if the pieces do not fit together
    return material


def server_context(material: TlsMaterial) -> ssl.SSLContext:
    """An SSLContext for the HTTP server: TLS ≥ the configured minimum (1.2 unless set to 1.3;
    1.3 preferred), client certificates required and verified against the client CA when one is
    configured."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = material.min_version
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    try:
        ctx.load_cert_chain(material.cert_path, material.key_path, password=_no_password)
    except TlsConfigError:
        raise TlsConfigError(
            f"The TLS private key {material.key_path} is encrypted; inhouse needs an unencrypted key "
            "(protect it with file permissions), e.g. 'openssl pkey -in KEY -out plain.key'."
        ) from None
    except ssl.SSLError as err:
        if "KEY_VALUES_MISMATCH" in str(err) or "key values mismatch" in str(err).lower():
            raise TlsConfigError(
                f"The TLS private key {material.key_path} does not match the certificate "
                f"{material.cert_path}; use the key the certificate was issued for."
            ) from None
        raise TlsConfigError(
            f"Cannot use the TLS certificate {material.cert_path} with key {material.key_path}: "
            f"{err.reason or err}. Both must be PEM; the certificate file may hold the chain."
        ) from None
    if material.client_ca_path is not None:
        try:
            ctx.load_verify_locations(cafile=str(material.client_ca_path))
        except ssl.SSLError as err:
            raise TlsConfigError(
                f"The client CA file {material.client_ca_path} holds no usable PEM certificate "
                f"({err.reason or err})."
            ) from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    else:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
