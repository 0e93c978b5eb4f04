"""TLS and mutual TLS on both transports, from one set of settings, with certificates made in
the test: a client without a certificate (or with one the CA did not sign) is refused on both
ports; one signed by the CA succeeds; TLS 1.3 is negotiated and TLS < 1.2 refused."""

from __future__ import annotations

import socket
import ssl
import time
import warnings
from pathlib import Path

import httpx
import numpy as np
import pytest
import tritonclient.grpc as tgrpc
from cryptography.hazmat.primitives import serialization
from tritonclient.utils import InferenceServerException

from certs import Pki, make_pki
from conftest import RunningServer, run_server
from inhouse.server import StartupError
from inhouse.settings import SettingsError, load_settings


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _grpc(srv: RunningServer, pki: Pki, client: bool = True, stranger: bool = False) -> tgrpc.InferenceServerClient:
    pair = pki.stranger if stranger else pki.client
    return tgrpc.InferenceServerClient(
        f"localhost:{srv.grpc_port}", ssl=True, root_certificates=str(pki.ca.cert),
        private_key=str(pair.key) if client else None, certificate_chain=str(pair.cert) if client else None,
    )


def _https(pki: Pki, client: bool = True, stranger: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.cert))
    if client:
        pair = pki.stranger if stranger else pki.client
        ctx.load_cert_chain(pair.cert, pair.key)
    return ctx


def _handshake(port: int, ctx: ssl.SSLContext, alpn: str) -> str:
    ctx.set_alpn_protocols([alpn])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        return str(tls.version())


def test_mutual_tls_on_both_transports(repo: Path, pki: Pki) -> None:
    with run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_client_ca=pki.ca.cert) as srv:
        url = f"https://localhost:{srv.server.http_port}"
        assert srv.url.startswith("https://")
        # a client certificate signed by the CA: served on both ports
        with httpx.Client(base_url=url, verify=_https(pki)) as c:
            assert c.get("/v2/health/ready").json() == {"ready": True}
        client = _grpc(srv, pki)
        assert client.is_server_ready()
        x = tgrpc.InferInput("a", [1, 4], "FP32")
        x.set_data_from_numpy(np.ones((1, 4), np.float32))
        y = tgrpc.InferInput("b", [1, 4], "FP32")
        y.set_data_from_numpy(np.ones((1, 4), np.float32))
        assert client.infer("add", [x, y]).as_numpy("out").tolist() == [[2.0] * 4]
        client.close()
        # no client certificate, or one from another CA: refused on both ports
        for kwargs in ({"client": False}, {"stranger": True}):
            with pytest.raises(httpx.TransportError), httpx.Client(base_url=url, verify=_https(pki, **kwargs)) as c:
                c.get("/v2/health/ready")
            refused = _grpc(srv, pki, **kwargs)
            with pytest.raises(InferenceServerException) as err:
                refused.is_server_live(client_timeout=10)
            assert err.value.status() in ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED")
            refused.close()
        # a plaintext client gets nowhere either
        with pytest.raises(httpx.TransportError):
            httpx.get(f"http://localhost:{srv.server.http_port}/v2/health/ready", timeout=10)
        plain = tgrpc.InferenceServerClient(srv.grpc_target)
        with pytest.raises(InferenceServerException):
            plain.is_server_live(client_timeout=10)
        plain.close()


def _tls11_client(pki: Pki) -> ssl.SSLContext | None:
    """A client that offers only TLS 1.0 / 1.1, or None when this OpenSSL cannot build one."""
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.load_verify_locations(pki.ca.cert)
    old.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            old.minimum_version = ssl.TLSVersion.TLSv1
            old.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        return None
    return old


def test_tls_versions(repo: Path, pki: Pki) -> None:
    unchecked = []  # ports whose TLS 1.1 refusal this OpenSSL cannot test; every other check still runs
    with run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key) as srv:
        ports = {"h2": srv.grpc_port, "http/1.1": srv.server.http_port}
        for alpn, port in ports.items():
            assert _handshake(port, _https(pki, client=False), alpn) == "TLSv1.3"
            tls12 = _https(pki, client=False)
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            assert _handshake(port, tls12, alpn) == "TLSv1.2"
            old = _tls11_client(pki)
            if old is None:
                unchecked.append(alpn)
                continue
            with pytest.raises((ssl.SSLError, ConnectionError)) as err:
                _handshake(port, old, alpn)
            if "NO_PROTOCOLS_AVAILABLE" in str(err.value):  # the client refused to send its hello
                unchecked.append(alpn)
                continue
            print(f"TLS 1.1 client on {alpn}: {err.value}")
        # TLS without a client CA: no client certificate needed, on both ports
        with httpx.Client(base_url=f"https://localhost:{ports['http/1.1']}", verify=_https(pki, client=False)) as c:
            assert c.get("/v2/health/live").status_code == 200
        assert _grpc(srv, pki, client=False).is_server_live()
    if unchecked:
        pytest.skip(f"TLS 1.3 and 1.2 checked on both ports; this OpenSSL cannot offer TLS 1.1, so its refusal "
                    f"was not checked on {', '.join(unchecked)}")


def test_tls_13_can_be_required_on_both_ports(repo: Path, pki: Pki) -> None:
    """The HTTP port and the gRPC port's HTTP/2 front both refuse a TLS 1.2-only client."""
    with run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_min_version="1.3") as srv:
        for port, alpn in ((srv.server.http_port, "http/1.1"), (srv.grpc_port, "h2")):
            tls12 = _https(pki, client=False)
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            with pytest.raises((ssl.SSLError, ConnectionError)):
                _handshake(port, tls12, alpn)
            assert _handshake(port, _https(pki, client=False), alpn) == "TLSv1.3"
        with httpx.Client(base_url=f"https://localhost:{srv.server.http_port}", verify=_https(pki, client=False)) as c:
            assert c.get("/v2/health/live").status_code == 200
        assert _grpc(srv, pki, client=False).is_server_live()


def test_tls_13_with_grpcio_on_the_port_is_refused_at_start(repo: Path, pki: Pki, tmp_path: Path) -> None:
    """grpcio's server credentials have no minimum TLS version: requiring 1.3 with grpc.aio on the
    port would be a promise the gRPC port does not keep."""
    with pytest.raises(StartupError, match=r"cannot be enforced with grpc.front: grpcio.*grpc.front: fast"), \
            run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key, tls_min_version="1.3",
                       grpc={"front": "grpcio"}):
        pass
    cfg = tmp_path / "inhouse.yaml"
    cfg.write_text("tls_min_version: 1.3\n")  # a YAML number
    assert load_settings(cfg).tls_min_version == "1.3"
    with pytest.raises(SettingsError, match="tls_min_version"):
        load_settings(None, tls_min_version="1.1")


@pytest.mark.parametrize("case", ["missing-cert", "mismatch", "ca-without-cert", "key-only", "bad-ca",
                                  "missing-ca", "encrypted-key", "not-pem"])
def test_misconfiguration_fails_at_start(repo: Path, pki: Pki, case: str, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    locked = tmp_path / "locked.key"
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), None)
    locked.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    der = tmp_path / "server.der"
    der.write_bytes(b"\x30\x82binary")
    settings, expected = {
        "missing-cert": ({"tls_cert": tmp_path / "nope.crt", "tls_key": pki.server.key},
                         "nope.crt (--tls-cert) does not exist"),
        "mismatch": ({"tls_cert": pki.server.cert, "tls_key": pki.client.key}, "does not match the certificate"),
        "ca-without-cert": ({"tls_client_ca": pki.ca.cert}, "--tls-client-ca needs --tls-cert and --tls-key"),
        "key-only": ({"tls_key": pki.server.key}, "needs both --tls-cert and --tls-key"),
        "bad-ca": ({"tls_cert": pki.server.cert, "tls_key": pki.server.key, "tls_client_ca": garbage},
                   "client CA file"),
        "missing-ca": ({"tls_cert": pki.server.cert, "tls_key": pki.server.key, "tls_client_ca": tmp_path / "x"},
                       "(--tls-client-ca) does not exist"),
        "encrypted-key": ({"tls_cert": pki.server.cert, "tls_key": locked}, "is encrypted"),
        "not-pem": ({"tls_cert": der, "tls_key": pki.server.key}, "is not PEM"),
    }[case]
    with pytest.raises(StartupError) as err, run_server(repo, **settings):
        pass
    assert expected in str(err.value)


def test_cli_reports_tls_misconfiguration(repo: Path, pki: Pki, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from inhouse.cli import app

    result = CliRunner().invoke(app, [
        "serve", "--repo", str(repo), "--http-port", "0", "--grpc-port", "0", "--data-dir", str(tmp_path / "d"),
        "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.client.key), "--tls-client-ca", str(pki.ca.cert)])
    assert result.exit_code == 1
    assert "does not match the certificate" in result.output


def test_stop_does_not_wait_for_idle_tls_clients(repo: Path, pki: Pki) -> None:
    """An idle keep-alive client never answers the server's TLS close: stopping must not wait
    drain_timeout_s for it."""
    with httpx.Client(verify=_https(pki, client=False)) as c:
        with run_server(repo, tls_cert=pki.server.cert, tls_key=pki.server.key, drain_timeout_s=20) as srv:
            r = c.get(f"https://localhost:{srv.server.http_port}/v2/health/live")
            assert r.status_code == 200  # the connection stays open, idle
            started = time.monotonic()
        took = time.monotonic() - started
    assert took < 5, f"stop took {took:.1f} s with one idle TLS client"
