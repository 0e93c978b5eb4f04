"""The client commands against a real server: inhouse infer (numpy in/out, JSON, table, TLS,
mutual TLS), inhouse models, the client config file, and clear errors."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import numpy as np
import pytest
import trustme
from typer.testing import CliRunner

from conftest import RunningServer, run_server
from inhouse.cli import app
from inhouse.client import ClientError, InhouseClient

runner = CliRunner()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_infer_npy_in_npy_out(server: RunningServer, tmp_path: Path) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    np.save(tmp_path / "a.npy", a)
    res = runner.invoke(app, ["infer", "add", "--url", server.url, "-i", f"a=@{tmp_path / 'a.npy'}",
                              "-i", "b=[[1,1,1,1],[2,2,2,2]]", "--output-dir", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    assert "out  float32  shape [2, 4]" in res.output
    np.testing.assert_allclose(np.load(tmp_path / "out" / "out.npy"), a + np.array([[1.0], [2.0]]))


def test_infer_json_output_and_single_input_shorthand(server: RunningServer, tmp_path: Path) -> None:
    np.save(tmp_path / "x.npy", np.ones((3, 32), np.float64))  # cast to the model's FP32
    res = runner.invoke(app, ["infer", "mlp", "--url", server.url, "-i", f"@{tmp_path / 'x.npy'}", "--format",
                              "json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    out = doc["outputs"][0]
    assert doc["model_name"] == "mlp" and out["name"] == "probabilities" and out["shape"] == [3, 2]
    assert abs(sum(out["data"][:2]) - 1.0) < 1e-5


def test_infer_strings_and_npz(server: RunningServer, tmp_path: Path) -> None:
    np.savez(tmp_path / "in.npz", x=np.array([["héllo", "b"]]))
    res = runner.invoke(app, ["infer", "echo-str", "--url", server.url, "--inputs", str(tmp_path / "in.npz"),
                              "--format", "json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["outputs"][0]["data"] == ["héllo", "b"]


def test_infer_errors_are_clear(server: RunningServer, tmp_path: Path) -> None:
    res = runner.invoke(app, ["infer", "nope", "--url", server.url, "-i", "[1]"])
    assert res.exit_code == 1 and "HTTP 404" in res.output and "[1002]" in res.output
    res = runner.invoke(app, ["infer", "add", "--url", server.url, "-i", "c=[1]"])
    assert res.exit_code == 1 and "no input 'c'" in res.output and "a, b" in res.output
    res = runner.invoke(app, ["infer", "add", "--url", server.url, "-i", "[1]"])
    assert res.exit_code == 1 and "has no name" in res.output
    res = runner.invoke(app, ["infer", "add", "--url", server.url, "-i", "a=@/no/such.npy", "-i", "b=[1]"])
    assert res.exit_code == 1 and "Cannot read /no/such.npy" in res.output
    res = runner.invoke(app, ["infer", "add", "--url", server.url, "-i", "a=[[1,2,3,4]]", "-i", "b=[[1,2]]"])
    assert res.exit_code == 1 and "[2005]" in res.output
    res = runner.invoke(app, ["infer", "echo-i64", "--url", server.url, "-i", "x=[[1.5]]"])
    assert res.exit_code == 1 and "holds floats but the model wants INT64" in res.output
    res = runner.invoke(app, ["infer", "add", "--url", server.url])
    assert res.exit_code == 2 and "--input" in res.output


def test_unreachable_server_and_bad_url() -> None:
    url = f"http://127.0.0.1:{_free_port()}"
    for args in (["models", "list"], ["infer", "m", "-i", "[1]"], ["chat", "-m", "hi", "--model", "x"]):
        res = runner.invoke(app, [*args, "--url", url])
        assert res.exit_code == 1, (args, res.output)
        assert f"Cannot reach the inhouse server at {url}; is it running?" in res.output
    with pytest.raises(ClientError, match="must start with http"):
        InhouseClient("localhost:8000")


def test_client_config_file_and_flag_precedence(server: RunningServer, tmp_path: Path) -> None:
    cfg = tmp_path / "client.yaml"
    cfg.write_text(f"url: {server.url}\ntimeout: 5\nretries: 1\n")
    res = runner.invoke(app, ["models", "list", "--client-config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "mlp" in res.output and "READY" in res.output
    dead = f"http://127.0.0.1:{_free_port()}"
    res = runner.invoke(app, ["models", "list", "--client-config", str(cfg), "--url", dead])  # flag wins
    assert res.exit_code == 1 and dead in res.output
    res = runner.invoke(app, ["models", "list"], env={"INHOUSE_CLIENT_CONFIG": str(cfg)})
    assert res.exit_code == 0 and "mlp" in res.output
    cfg.write_text("url: http://x\ntimout: 5\n")
    res = runner.invoke(app, ["models", "list", "--client-config", str(cfg)])
    assert res.exit_code == 2 and "timout: unknown key" in res.output
    res = runner.invoke(app, ["models", "list", "--client-config", str(tmp_path / "missing.yaml")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_models_load_unload(server: RunningServer) -> None:
    res = runner.invoke(app, ["models", "unload", "mlp", "--url", server.url])
    assert res.exit_code == 0 and "UNLOADED" in res.output
    res = runner.invoke(app, ["models", "load", "mlp", "--url", server.url])
    assert res.exit_code == 0 and "READY" in res.output
    res = runner.invoke(app, ["models", "load", "ghost", "--url", server.url])
    assert res.exit_code == 1 and "[1002]" in res.output


def test_tls_and_mutual_tls(repo: Path, tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "server.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    client_cert = ca.issue_cert("client@example.com")
    client_cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "client.pem"))
    with run_server(repo, tls_cert=tmp_path / "server.pem", tls_key=tmp_path / "server.pem",
                    tls_client_ca=tmp_path / "ca.pem") as srv:
        assert srv.url.startswith("https://")
        args = ["infer", "add", "--url", srv.url, "-i", "a=[[1,2,3,4]]", "-i", "b=[[1,1,1,1]]", "--format", "json"]
        res = runner.invoke(app, [*args, "--ca-cert", str(tmp_path / "ca.pem"), "--client-cert",
                                  str(tmp_path / "client.pem")])
        assert res.exit_code == 0, res.output
        assert json.loads(res.output)["outputs"][0]["data"] == [2, 3, 4, 5]
        res = runner.invoke(app, args)  # the private CA is not trusted by default
        assert res.exit_code == 1 and "TLS handshake" in res.output and "--ca-cert" in res.output
        res = runner.invoke(app, [*args, "--ca-cert", str(tmp_path / "ca.pem")])  # no client certificate
        assert res.exit_code == 1
        res = runner.invoke(app, [*args, "--ca-cert", str(tmp_path / "missing.pem")])
        assert res.exit_code == 1 and "Cannot use the TLS files" in res.output
