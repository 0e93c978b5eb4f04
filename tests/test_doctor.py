"""`inhouse doctor` on good and broken repositories, run through the real CLI."""

from __future__ import annotations

import datetime as dt
import socket
import subprocess
import sys
from pathlib import Path

import orjson
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from typer.testing import CliRunner

from inhouse.cli import app
from models import add_model, mlp_model, write_model

runner = CliRunner()


def doctor(*args: str) -> tuple[int, list[dict[str, str]]]:
    result = runner.invoke(app, ["doctor", "--json", *args])
    return result.exit_code, orjson.loads(result.stdout)


def _problems(findings: list[dict[str, str]]) -> list[dict[str, str]]:
    return [f for f in findings if f["severity"] in ("error", "warning")]


def test_good_repository_passes(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model(), checksum=True)
    write_model(repo, "mlp", mlp_model())
    code, findings = doctor("--repo", str(repo), "--data-dir", str(tmp_path / "data"),
                            "--http-port", "0", "--grpc-port", "0", "--load")
    assert code == 0, findings
    assert not [f for f in findings if f["severity"] == "error"]
    assert {"check": "model add", "severity": "ok"}.items() <= next(
        f for f in findings if f["check"] == "model add").items()
    assert any(f["check"] == "runtime" and "CPUExecutionProvider" in f["finding"] for f in findings)


def test_broken_repository_lists_every_problem_with_a_fix(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "typo", add_model(), {"batching": {"max_batch_sise": 4}})
    write_model(repo, "tampered", add_model(), checksum=True)
    (repo / "tampered" / "1" / "model.onnx").write_bytes(add_model(scale=2.0))
    write_model(repo, "gpu-only", add_model(), {"onnxruntime": {"providers": ["tensorrt"]}})
    write_model(repo, "renamed", add_model(), {"onnxruntime": {"file": "other.onnx"}})
    write_model(repo, "garbage", b"not onnx")
    write_model(repo, "fine", add_model())
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code, findings = doctor("--repo", str(repo), "--data-dir", str(tmp_path / "data"), "--http-port", str(port),
                                "--grpc-port", "0", "--load")
    assert code == 1
    errors = {f["check"]: f for f in findings if f["severity"] == "error"}
    assert "max_batch_sise" in errors["model typo"]["finding"] and "max_batch_size" in errors["model typo"]["finding"]
    assert "[1004]" in errors["model tampered"]["finding"] and "restore" in errors["model tampered"]["fix"]
    gpu_only = errors["model gpu-only"]
    assert "tensorrt" in gpu_only["finding"].lower() and "onnxruntime" in gpu_only["fix"]
    assert "other.onnx" in errors["model renamed"]["finding"]
    assert "does not load" in errors["model garbage"]["finding"]
    assert f":{port}" in errors["ports"]["finding"] and "--http-port" in errors["ports"]["fix"]
    assert "model fine" not in errors
    assert all(f["fix"] for f in _problems(findings))


def test_missing_repository_and_bad_config(tmp_path: Path) -> None:
    code, findings = doctor("--repo", str(tmp_path / "nope"), "--no-ports")
    assert code == 1 and any("does not exist" in f["finding"] for f in findings)
    cfg = tmp_path / "inhouse.yaml"
    cfg.write_text(yaml.safe_dump({"http_prot": 1}))
    code, findings = doctor("--config", str(cfg))
    assert code == 1 and findings[0]["check"] == "config" and "http_prot" in findings[0]["finding"]


def _cert(tmp_path: Path, name: str, days_valid: int, key: ec.EllipticCurvePrivateKey) -> Path:
    now = dt.datetime.now(dt.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "inhouse.test")])
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=400)).not_valid_after(now + dt.timedelta(days=days_valid))
            .sign(key, hashes.SHA256()))
    path = tmp_path / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path


def _key(tmp_path: Path, name: str) -> tuple[ec.EllipticCurvePrivateKey, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / f"{name}.key"
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return key, path


def test_tls_files(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    key, key_path = _key(tmp_path, "server")
    _, other_key = _key(tmp_path, "other")
    base = ["--repo", str(repo), "--no-ports", "--data-dir", str(tmp_path / "data")]

    good = _cert(tmp_path, "good", 365, key)
    code, findings = doctor(*base, "--tls-cert", str(good), "--tls-key", str(key_path))
    assert code == 0
    assert any(f["check"] == "tls" and "matches" in f["finding"] for f in findings)

    soon = _cert(tmp_path, "soon", 5, key)
    code, findings = doctor(*base, "--tls-cert", str(soon), "--tls-key", str(key_path))
    assert code == 0 and any(f["severity"] == "warning" and "expires in" in f["finding"] for f in findings)

    expired = _cert(tmp_path, "expired", -1, key)
    code, findings = doctor(*base, "--tls-cert", str(expired), "--tls-key", str(key_path))
    assert code == 1 and any(f["severity"] == "error" and "expired" in f["finding"] for f in findings)

    code, findings = doctor(*base, "--tls-cert", str(good), "--tls-key", str(other_key))
    assert code == 1 and any("does not match" in f["finding"] for f in findings)

    code, findings = doctor(*base, "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(key_path))
    assert code == 1 and any("does not exist" in f["finding"] for f in findings)


def test_table_output_and_serve_startup_diagnosis(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    write_model(repo, "add", add_model())
    result = runner.invoke(app, ["doctor", "--repo", str(repo), "--no-ports"])
    assert result.exit_code == 0 and "how to fix" in result.stdout and "model add" in result.stdout
    # `inhouse serve` on a busy port exits 1 and prints the doctor's diagnosis
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cli = [sys.executable, "-c", "from inhouse.cli import main; main()"]
        proc = subprocess.run([*cli, "serve", "--repo", str(repo), "--http-port", str(port), "--grpc-port", "0",
                               "--data-dir", str(tmp_path / "data"), "--load", "none"],
                              capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert f"Cannot listen for HTTP on 127.0.0.1:{port}" in proc.stderr
    assert "how to fix" in proc.stderr and "--http-port" in proc.stderr


def test_key_store_and_audit_chain(tmp_path: Path) -> None:
    import sqlite3

    from inhouse.security.audit import AUDIT_DB, AuditLog

    repo, data = tmp_path / "models", tmp_path / "data"
    write_model(repo, "add", add_model())
    args = ("--repo", str(repo), "--data-dir", str(data), "--http-port", "0", "--grpc-port", "0")

    def doctor_with_auth(*a: str) -> tuple[int, list[dict[str, str]]]:
        result = runner.invoke(app, ["doctor", "--json", *a], env={"INHOUSE_AUTH": "true"})
        return result.exit_code, orjson.loads(result.stdout)

    def by_check(findings: list[dict[str, str]], name: str) -> dict[str, str]:
        return next(f for f in findings if f["check"] == name)

    code, findings = doctor_with_auth(*args)
    assert code != 0 and by_check(findings, "keys")["severity"] == "error"  # --auth without any key

    created = runner.invoke(app, ["keys", "create", "--name", "app", "--scopes", "infer", "--data-dir", str(data)])
    assert created.exit_code == 0, created.stdout
    log = AuditLog(data)
    for i in range(5):
        log.append_admin("test.action", {"i": i})
    log.close()
    code, findings = doctor_with_auth(*args)
    assert code == 0, findings
    assert by_check(findings, "keys")["severity"] == "ok" and "1 active" in by_check(findings, "keys")["finding"]
    audit = by_check(findings, "audit")
    assert audit["severity"] == "ok" and "6 entries" in audit["finding"]  # 5 + the audited key creation

    db = sqlite3.connect(data / AUDIT_DB)
    db.execute("UPDATE audit SET action = 'forged' WHERE seq = (SELECT MIN(seq) + 1 FROM audit)")
    db.commit()
    db.close()
    code, findings = doctor_with_auth(*args)
    assert code != 0
    assert by_check(findings, "audit")["severity"] == "error"
    assert "broken" in by_check(findings, "audit")["finding"]
