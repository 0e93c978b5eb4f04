"""What the fault cases share: a real ``inhouse serve`` process on free loopback ports, a small
raw HTTP/1.1 client (cheap enough that hundreds of connections fit beside the server on a small
machine), gRPC infer calls, percentiles and the server's memory."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from bench.models import mlp_model
from onnx import TensorProto, helper, numpy_helper


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pct(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``; NaN when there are none."""
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- models -------------------------------------------------------------------------------------
def slow_model(layers: int = 8, width: int = 512) -> bytes:
    """A model slow on purpose: a MatMul chain on [batch, width] (its cost grows with the batch)."""
    rng = np.random.default_rng(1)
    inits, nodes, prev = [], [], "x"
    for i in range(layers):
        inits.append(numpy_helper.from_array(rng.standard_normal((width, width)).astype(np.float32) * 0.01, f"w{i}"))
        nodes.append(helper.make_node("MatMul", [prev, f"w{i}"], [f"h{i}"]))
        prev = f"h{i}"
    nodes.append(helper.make_node("Identity", [prev], ["y"]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", width])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", width])
    graph = helper.make_graph(nodes, "slow", [x], [y], initializer=inits)
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


def write_model(repo: Path, name: str, onnx_bytes: bytes, spec: dict[str, Any] | None = None,
                versions: Sequence[int] = (1,)) -> None:
    for v in versions:
        (repo / name / str(v)).mkdir(parents=True, exist_ok=True)
        (repo / name / str(v) / "model.onnx").write_bytes(onnx_bytes)
    (repo / name / "model.yaml").write_text(yaml.safe_dump({"name": name, "backend": "onnxruntime", **(spec or {})}))


def mlp(seed: int = 0) -> bytes:
    return mlp_model(seed=seed)


def mlp_json(rows: int = 1) -> bytes:
    data = np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32).round(3)
    return json.dumps({"inputs": [{"name": "features", "shape": [rows, 32], "datatype": "FP32",
                                   "data": data.ravel().tolist()}]}).encode()


def slow_binary(rows: int, width: int = 512) -> tuple[bytes, list[tuple[str, str]]]:
    """A v2 request for the slow model with its tensor in the binary extension (cheap to parse)."""
    x = np.full((rows, width), 0.01, np.float32)
    header = json.dumps({"inputs": [{"name": "x", "shape": [rows, width], "datatype": "FP32",
                                     "parameters": {"binary_data_size": x.nbytes}}]}).encode()
    return header + x.tobytes(), [("Inference-Header-Content-Length", str(len(header)))]


def slow_json(rows: int, width: int = 512) -> bytes:
    return json.dumps({"inputs": [{"name": "x", "shape": [rows, width], "datatype": "FP32",
                                   "data": [0.01] * (rows * width)}]}).encode()


# ---- the server ---------------------------------------------------------------------------------
class Server:
    """``inhouse serve`` as a child process in its own session (so a SIGKILL can take its audit
    writer with it), REST and gRPC on free loopback ports."""

    def __init__(self, repo: Path, data_dir: Path, *, auth: bool = False, env: dict[str, str] | None = None,
                 args: Sequence[str] = (), log: Path | None = None) -> None:
        self.repo, self.data_dir, self.auth = repo, data_dir, auth
        self.env = {**os.environ, "INHOUSE_LOG_LEVEL": "warning", **(env or {})}
        self.args = list(args)
        self.log_path = log or data_dir.parent / f"server-{os.getpid()}-{id(self)}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.http_port = self.grpc_port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the server is not running")
        return self.proc.pid

    def start(self, timeout: float = 180) -> Server:
        self.http_port, self.grpc_port = free_port(), free_port()
        cmd = [sys.executable, "-m", "inhouse", "serve", "--repo", str(self.repo), "--data-dir", str(self.data_dir),
               "--http-port", str(self.http_port), "--grpc-port", str(self.grpc_port), *self.args,
               *(["--auth"] if self.auth else [])]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        end = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited during start-up: {self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = asyncio.run(_once(self.url, b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"))
                if status == 200:
                    return self
            if time.monotonic() > end:
                raise RuntimeError(f"the server did not become ready: {self.log_tail()}")
            time.sleep(0.2)

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def rss_bytes(self) -> int:
        """Resident memory of the server process (VmRSS)."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise RuntimeError("no VmRSS")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def kill_all(self) -> None:
        """SIGKILL to the server and every process of its session (the audit writer too)."""
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(30)

    def wait(self, timeout: float) -> int:
        if self.proc is None:
            return 0
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.kill_all()

    @contextlib.contextmanager
    def running(self) -> Iterator[Server]:
        self.start()
        try:
            yield self
        finally:
            self.stop()


def create_key(data_dir: Path, scopes: Sequence[str] = ("infer", "admin")) -> str:
    """A fresh API key in the server's key store (before it starts, or while it runs)."""
    from inhouse.security.keys import KeyStore

    store = KeyStore(data_dir)
    try:
        key, _ = store.create("faults", scopes)
    finally:
        store.close()
    return key


def audit_request_ids(data_dir: Path) -> tuple[set[str], bool, int]:
    """The request ids in the audit log, whether its chain verifies, and how many entries it holds."""
    from inhouse.security.audit import AuditLog

    log = AuditLog(data_dir, create=False)
    try:
        ids = {str(e["request_id"]) for e in log.entries() if e["request_id"]}
        report = log.verify()
    finally:
        log.close()
    return ids, report.ok, report.entries


# ---- HTTP ---------------------------------------------------------------------------------------
def request_bytes(method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if body or method in ("POST", "PUT"):
        lines += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class HttpConn:
    """One keep-alive HTTP/1.1 connection; reconnects when the server closed it."""

    def __init__(self, url: str) -> None:
        host, _, port = url.removeprefix("http://").partition(":")
        self.host, self.port = host, int(port)
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.headers: dict[str, str] = {}  # of the last response, names in lower case

    async def request(self, raw: bytes, limit_s: float = 60) -> tuple[int, bytes]:
        """(status, body); raises OSError / TimeoutError / EOFError when the exchange broke."""
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            self.writer.write(raw)
            return await asyncio.wait_for(_read_response(self.reader, self), limit_s)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def _read_response(reader: asyncio.StreamReader, conn: HttpConn | None) -> tuple[int, bytes]:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise EOFError("the server closed the connection") from exc
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length, close, chunked = 0, False, False
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        k = k.strip().lower()
        headers[k] = v.strip()
        if k == "content-length":
            length = int(v)
        elif k == "connection" and "close" in v.lower():
            close = True
        elif k == "transfer-encoding" and "chunked" in v.lower():
            chunked = True
    if chunked:
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            body += await reader.readexactly(size + 2)
            if size == 0:
                break
    else:
        body = await reader.readexactly(length)
    if conn is not None:
        conn.headers = headers
        if close:
            conn.close()
    return status, body


async def _once(url: str, raw: bytes) -> tuple[int, bytes]:
    conn = HttpConn(url)
    try:
        return await conn.request(raw, limit_s=5)
    finally:
        conn.close()


def http(url: str, method: str, path: str, body: bytes = b"", headers: Sequence[tuple[str, str]] = ()) -> int:
    """One request, its status."""
    return asyncio.run(_once(url, request_bytes(method, path, body, headers)))[0]


# ---- gRPC ---------------------------------------------------------------------------------------
def grpc_mlp_request(model: str, rows: int = 1, version: str = "") -> Any:
    from inhouse.protocols.proto import grpc_service_pb2 as pb

    x = np.random.default_rng(0).standard_normal((rows, 32)).astype(np.float32)
    req = pb.ModelInferRequest(model_name=model, model_version=version)
    req.inputs.add(name="features", datatype="FP32", shape=[rows, 32])
    req.raw_input_contents.append(x.tobytes())
    return req


def grpc_stub(target: str) -> tuple[Any, Any]:
    """(channel, GRPCInferenceService stub) on grpc.aio: create inside the event loop that uses it."""
    import grpc

    from inhouse.protocols.proto import grpc_service_pb2_grpc as pb_grpc

    channel = grpc.aio.insecure_channel(target)
    return channel, pb_grpc.GRPCInferenceServiceStub(channel)
