"""Abuse cases against real ``inhouse serve`` processes on loopback: schema fuzzing of every
route, gRPC fuzzing (random and mutated messages, oversized and truncated frames, raw HTTP/2),
the authentication matrix, and slow or oversized HTTP clients. Every loop is bounded.

    PYTHONPATH=src python -m bench.faults.case_abuse [--quick] [--only schema,grpc-fuzz,auth,slow]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import psutil
from bench.faults.table import Row, render

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's tiny models and its auth matrix

import auth_matrix  # noqa: E402
from models import add_model, identity_model, write_model  # noqa: E402

CASES = {"schema", "grpc-fuzz", "auth", "slow"}
_ADD_SPEC = {"inputs": [{"name": "a", "dtype": "FP32", "shape": [-1, 4]},
                        {"name": "b", "dtype": "FP32", "shape": [-1, 4]}]}
INFER_DOC = json.dumps({"inputs": [{"name": n, "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}
                                   for n in "ab"]}).encode()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


class Served:
    """One ``inhouse serve`` process."""

    def __init__(self, proc: subprocess.Popen[bytes], http_port: int, grpc_port: int, log: Path) -> None:
        self.proc = proc
        self.url = f"http://127.0.0.1:{http_port}"
        self.http_port = http_port
        self.grpc_target = f"127.0.0.1:{grpc_port}"
        self.log = log

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_mb(self) -> float:
        return float(psutil.Process(self.proc.pid).memory_info().rss) / 2**20


def make_repo(root: Path) -> Path:
    repo = root / "models"
    repo.mkdir(parents=True, exist_ok=True)
    write_model(repo, "add", add_model(), _ADD_SPEC)
    write_model(repo, "echo-str", identity_model(8))
    return repo


@contextlib.contextmanager
def serve(root: Path, *, auth: bool = False, env: dict[str, str] | None = None,
          data_dir: Path | None = None) -> Iterator[Served]:
    http_port, grpc_port = _free_port(), _free_port()
    data = data_dir or root / "data"
    log = root / f"serve-{http_port}.log"
    cmd = [sys.executable, "-m", "inhouse", "serve", "--repo", str(root / "models"), "--data-dir", str(data),
           "--host", "127.0.0.1", "--http-port", str(http_port), "--grpc-port", str(grpc_port),
           "--load", "add,echo-str", *(["--auth"] if auth else [])]
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "INHOUSE_LOG_LEVEL": "warning", **(env or {})})
    srv = Served(proc, http_port, grpc_port, log)
    try:
        deadline = time.monotonic() + 90
        while True:
            if not srv.alive():
                raise RuntimeError(f"inhouse serve exited: {log.read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(srv.url + "/v2/health/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError("inhouse serve did not become ready")
            time.sleep(0.2)
        yield srv
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# ---- schemathesis on /openapi.json --------------------------------------------------------------
def case_schema(quick: bool, root: Path) -> Row:
    import hypothesis
    import requests
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.generation import GenerationMode

    from inhouse.security.keys import KeyStore

    examples = 8 if quick else 60
    data = root / "data-schema"
    store = KeyStore(data)
    key = store.create("fuzz", ["infer", "admin", "metrics"])[0]
    store.close()
    calls, fivexx, crashes, ops = 0, [], 0, 0
    with serve(root, auth=True, data_dir=data) as srv:
        schema = schemathesis.openapi.from_url(srv.url + "/openapi.json", headers={"x-api-key": key})
        session = requests.Session()

        def fuzz(strategy: Any, mode: str) -> None:
            @given(case=strategy)
            @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])
            def run(case: Any) -> None:
                nonlocal calls, crashes
                for headers in ({"x-api-key": key}, {}) if mode == "positive" else ({"x-api-key": key},):
                    calls += 1
                    try:
                        resp = case.call(base_url=srv.url, session=session, headers=headers, timeout=30)
                    except requests.RequestException as err:
                        crashes += 1
                        fivexx.append(f"{case.method} {case.formatted_path}: {type(err).__name__}")
                        continue
                    if resp.status_code >= 500:
                        fivexx.append(f"{case.method} {case.formatted_path} -> {resp.status_code}")

            with contextlib.suppress(hypothesis.errors.Unsatisfiable):
                run()

        for result in schema.get_all_operations():
            op = result.ok()
            ops += 1
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                fuzz(op.as_strategy(generation_mode=mode), mode.value)
        crashes += 0 if srv.alive() else 1
    return Row("schemathesis on /openapi.json (every route, positive + negative, with and without a key)",
               "5xx responses, crashes", "0", f"{len(fivexx)}, {crashes}", not fivexx and not crashes,
               f"{calls} requests over {ops} operations ({examples} examples per operation and mode); "
               + "; ".join(fivexx[:5]))


# ---- gRPC fuzz ------------------------------------------------------------------------------------
_FAIL = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
_IDENT: dict[str, Any] = {"request_serializer": None, "response_deserializer": None}


def _valid_infer() -> bytes:
    from inhouse.protocols.proto import grpc_service_pb2 as pb

    req = pb.ModelInferRequest(model_name="add", id="fuzz")
    for n in "ab":
        t = req.inputs.add(name=n, datatype="FP32", shape=[1, 4])
        t.contents.fp32_contents.extend([1, 2, 3, 4])
    return bytes(req.SerializeToString())


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        op = rng.random()
        if op < 0.5 and b:
            b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.7 and b:
            del b[rng.randrange(len(b)):][: rng.randint(1, 8)]
        elif op < 0.85:
            pos = rng.randrange(len(b) + 1)
            b[pos:pos] = rng.randbytes(rng.randint(1, 16))
        else:
            b = b[: rng.randrange(len(b) + 1)]
    return bytes(b)


def _fuzz_base(method: str, guard: Any, cls: Any) -> bytes:
    """The valid message a method's fuzzing mutates. Loads and unloads name another model than
    the one the normal ModelInfer checks: most mutations still decode and still name it, and
    the server rightly unloads (or reloads) what it is told to, which is no failure to serve."""
    data = auth_matrix.grpc_request(cls, guard)
    if method.rsplit("/", 1)[1].endswith(("ModelLoad", "ModelUnload", "LoadModel", "UnloadModel")):
        msg = cls.FromString(data)
        setattr(msg, guard.model, "echo-str")
        data = bytes(msg.SerializeToString())
    return data


def _normal_infer(channel: grpc.Channel) -> bool:
    try:
        channel.unary_unary("/inference.GRPCInferenceService/ModelInfer", **_IDENT)(_valid_infer(), timeout=10)
        return True
    except grpc.RpcError:
        return False


def _h2_frame(kind: int, flags: int, stream: int, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", stream) + payload


def _hpack_literal(name: str, value: str) -> bytes:
    """A header as HPACK 'literal without indexing, new name', no Huffman (short strings only)."""
    n, v = name.encode(), value.encode()
    return b"\x00" + bytes([len(n)]) + n + bytes([len(v)]) + v


def _raw_h2(target: str, rng: random.Random) -> list[bytes]:
    """Raw HTTP/2 abuse, each a whole connection's bytes: gRPC calls with truncated or lying
    length prefixes, a compressed flag without an encoding, random frames, a broken preface."""
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + _h2_frame(4, 0, 0, b"")
    head = b"".join(_hpack_literal(k, v) for k, v in (
        (":method", "POST"), (":scheme", "http"), (":path", "/inference.GRPCInferenceService/ModelInfer"),
        (":authority", target), ("content-type", "application/grpc"), ("te", "trailers")))
    headers = _h2_frame(1, 4, 1, head)
    valid = _valid_infer()
    bodies = [
        b"\x00\x00\x00",  # a length prefix cut short
        b"\x00\xff\xff\xff\xff" + valid,  # claims 4 GiB
        b"\x00" + struct.pack(">I", 100) + valid[:10],  # claims 100 bytes, sends 10
        b"\x01" + struct.pack(">I", len(valid)) + valid,  # compressed flag, no grpc-encoding
        b"\x00" + struct.pack(">I", len(valid)) + valid + b"\x00\x00",  # trailing garbage
    ]
    out = [preface + headers + _h2_frame(0, 1, 1, body) for body in bodies]
    out.append(preface + headers)  # headers, then the connection drops mid-call
    out += [preface + b"".join(_h2_frame(rng.randrange(10), rng.randrange(256), rng.randrange(4),
                                         rng.randbytes(rng.randint(0, 64))) for _ in range(8))
            for _ in range(10)]
    out.append(b"GET / HTTP/1.1\r\n\r\n" + rng.randbytes(256))  # not HTTP/2 at all
    out.append(preface + _h2_frame(1, 4, 1, rng.randbytes(200)))  # headers that are not HPACK
    return out


def _send_raw(target: str, data: bytes) -> None:
    host, port = target.rsplit(":", 1)
    with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=3) as s:
        s.sendall(data)
        end = time.monotonic() + 1.0
        with contextlib.suppress(OSError):
            while time.monotonic() < end and s.recv(65536):
                pass


def case_grpc_fuzz(quick: bool, root: Path) -> Row:
    from grpc_health.v1 import health_pb2

    rng = random.Random(20)
    per_rpc = 20 if quick else 200
    max_bytes = 1 << 20
    counts: dict[str, int] = {}
    failures: list[str] = []
    bursts = served_after = 0
    with serve(root, env={"INHOUSE_GRPC__MAX_MESSAGE_BYTES": str(max_bytes)}) as srv:
        opts = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        with grpc.insecure_channel(srv.grpc_target, options=opts) as channel:
            rpcs = [r for r in auth_matrix.rpc_calls() if not r[0].startswith(f"/{health_pb2.DESCRIPTOR.package}")]
            valid = _valid_infer()

            def call(method: str, cs: bool, ss: bool, payload: bytes, what: str) -> None:
                code = auth_matrix.call_rpc(channel, method, payload, cs, ss, None, timeout=10)
                counts[code.name] = counts.get(code.name, 0) + 1
                if code in _FAIL:
                    failures.append(f"{what} {method.rsplit('/', 1)[1]} -> {code.name}")

            def burst(name: str, fn: Callable[[], None]) -> None:
                nonlocal bursts, served_after
                fn()
                bursts += 1
                if srv.alive() and _normal_infer(channel):
                    served_after += 1
                else:
                    failures.append(f"after {name}: the server did not answer a normal ModelInfer")

            burst("random bytes", lambda: [call(m, cs, ss, rng.randbytes(rng.randint(0, 512)), "random")
                                           for m, _g, _c, cs, ss in rpcs for _ in range(per_rpc)])
            burst("mutated ModelInfer", lambda: [
                call(m, cs, ss, _mutate(rng, valid), "mutated")
                for m, _g, _c, cs, ss in rpcs if m.endswith(("ModelInfer", "ModelStreamInfer"))
                for _ in range(per_rpc * 3)])
            burst("mutated messages of every RPC", lambda: [
                call(m, cs, ss, _mutate(rng, _fuzz_base(m, g, cls)), "mutated")
                for m, g, cls, cs, ss in rpcs for _ in range(per_rpc)])
            big = b"\x0a" + b"\xff\xff\x7f" + b"x" * (2 * max_bytes)  # > max_message_bytes
            burst("oversized messages", lambda: [call(m, cs, ss, big, "oversized") for m, _g, _c, cs, ss in rpcs])
            raw = _raw_h2(srv.grpc_target, rng)
            burst("raw HTTP/2 frames", lambda: [_send_raw(srv.grpc_target, d) for d in raw * (1 if quick else 5)])
        alive = srv.alive()
    total = sum(counts.values())
    internal = counts.get("INTERNAL", 0) + counts.get("UNKNOWN", 0)
    ok = not failures and alive and served_after == bursts
    return Row("gRPC fuzz: random and mutated messages to every KServe and OpenClaw RPC, oversized "
               "(> max_message_bytes) and truncated frames, raw HTTP/2",
               "crashes, INTERNAL/UNKNOWN; normal ModelInfer after each burst", "0; served",
               f"{0 if alive else 1}, {internal}; {served_after}/{bursts}", ok,
               f"{total} calls + {len(raw) * (1 if quick else 5)} raw connections; codes "
               + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + ("; " + "; ".join(failures[:5])
                                                                            if failures else ""))


# ---- the auth matrix ------------------------------------------------------------------------------
def _app_routes(root: Path) -> list[Any]:
    """The routes the server mounts, from an app built (not started) with the same settings."""
    from inhouse.server import InhouseServer
    from inhouse.settings import load_settings

    server = InhouseServer(load_settings(None, repo=root / "models", data_dir=root / "data-routes",
                                         http_port=0, grpc_port=0, load="none"))
    try:
        return list(server.app.routes)
    finally:
        server.security.close()


def case_auth(quick: bool, root: Path) -> Row:
    data = root / "data-auth"
    creds = auth_matrix.make_credentials(data)
    calls = auth_matrix.http_calls(_app_routes(root))
    with serve(root, auth=True, data_dir=data) as srv:
        n_http, bad_http = auth_matrix.run_http(srv.url, calls, creds)
        n_rpc, bad_rpc = auth_matrix.run_grpc(srv.grpc_target, creds)
    with serve(root, auth=True, data_dir=data, env={"INHOUSE_ALLOW_IPS": '["10.0.0.0/8"]'}) as srv:
        n2, bad2 = auth_matrix.run_http(srv.url, calls, creds, cases=["good"], want_all=403)
        n3, bad3 = auth_matrix.run_grpc(srv.grpc_target, creds, cases=["good"], want_all=403)
    bad = bad_http + bad_rpc + bad2 + bad3
    rpcs = len(auth_matrix.rpc_calls())
    return Row("auth matrix: every route and RPC x {none, wrong, revoked, expired, wrong scope, other model, "
               "wrong address (key bound elsewhere; server allow-list)}", "unexpected outcomes", "0",
               f"{len(bad)} of {n_http + n_rpc + n2 + n3}", not bad,
               f"{len(calls)} route-methods, {rpcs} RPCs; " + "; ".join(bad[:5]))


# ---- slow and oversized clients ------------------------------------------------------------------
class _Normal(threading.Thread):
    """A well-behaved client: sequential v2 infer requests, latencies kept per phase."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.phase = "before"
        self.lat: dict[str, list[float]] = {"before": [], "during": [], "after": []}
        self.errors = 0
        self.stop = threading.Event()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as c:
            while not self.stop.is_set():
                t = time.perf_counter()
                try:
                    ok = c.post("/v2/models/add/infer", content=INFER_DOC,
                                headers={"content-type": "application/json"}).status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.lat[self.phase].append(time.perf_counter() - t)
                self.errors += not ok
                time.sleep(0.005)


async def _answer(reader: asyncio.StreamReader, wait_s: float) -> str | None:
    """The status the server answered with ('closed' when it hung up), or None if it has not
    within ``wait_s`` (the client keeps sending)."""
    try:
        first = await asyncio.wait_for(reader.read(1), wait_s)
    except TimeoutError:
        return None
    except OSError:
        return "reset"
    if not first:
        return "closed"
    try:
        line = first + await asyncio.wait_for(reader.readline(), 5)
    except (TimeoutError, OSError):
        return "closed"
    return line.split(b" ")[1].decode() if line.startswith(b"HTTP/") else "closed"


async def _trickle(port: int, head: bytes, tail: bytes, seconds: float) -> tuple[str, float]:
    """``head`` at once, then ``tail`` one byte a second: the server's answer, and how long
    it let the client go on ('open' when it never cut it within ``seconds``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    status: str | None = None
    try:
        writer.write(head)
        for byte in tail:
            if time.monotonic() - start > seconds:
                break
            writer.write(bytes([byte]))
            await writer.drain()
            status = await _answer(reader, 1.0)
            if status is not None:
                break
    except OSError:
        status = "reset"
    writer.close()
    return status or "open", time.monotonic() - start


def _slowloris(port: int, seconds: float) -> Any:
    return _trickle(port, b"", b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\nx-slow: " + b"a" * 10_000, seconds)


def _trickle_body(port: int, seconds: float) -> Any:
    head = (b"POST /v2/models/add/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(INFER_DOC))
    return _trickle(port, head, INFER_DOC, seconds)


async def _huge_headers(port: int, n: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = b"GET /v2/health/live HTTP/1.1\r\nhost: x\r\n" + b"".join(b"x-h%d: v\r\n" % i for i in range(n)) + b"\r\n"
    with contextlib.suppress(OSError):
        writer.write(head)
        await writer.drain()
    status = await _answer(reader, 10)
    writer.close()
    return status or "open"


def _bomb(inflated: int) -> bytes:
    """gzip of ``inflated`` zero bytes, made by compressing 1 MiB at a time."""
    c = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = b"\0" * (1 << 20)
    parts = [c.compress(chunk) for _ in range(inflated >> 20)]
    return b"".join(parts) + c.flush()


async def _send_bomb(url: str, bomb: bytes) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        try:
            r = await c.post("/v2/models/add/infer", content=bomb,
                             headers={"content-encoding": "gzip", "content-type": "application/json"})
        except httpx.HTTPError as err:
            return type(err).__name__
        return f"{r.status_code}/{r.headers.get('inhouse-error-code')}"


def case_slow(quick: bool, root: Path) -> Row:
    header_s, body_s = (2.0, 3.0) if quick else (5.0, 10.0)
    conns = 50 if quick else 300
    bomb = _bomb(1 << 30)  # ~1 MB of gzip inflating to 1 GiB (gzip's ratio tops out near 1000:1)
    env = {"INHOUSE_HEADER_TIMEOUT_S": str(header_s), "INHOUSE_BODY_TIMEOUT_S": str(body_s)}
    with serve(root, env=env) as srv:
        normal = _Normal(srv.url)
        normal.start()
        time.sleep(3 if quick else 8)
        rss_before = srv.rss_mb()
        normal.phase = "during"
        peak = [rss_before]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.is_set():
                with contextlib.suppress(psutil.Error):
                    peak.append(srv.rss_mb())
                time.sleep(0.1)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()

        async def abuse() -> tuple[list[Any], list[Any], list[str], list[str]]:
            limit = max(header_s, body_s) + 20
            loris = [_slowloris(srv.http_port, limit) for _ in range(conns)]
            bodies = [_trickle_body(srv.http_port, limit) for _ in range(conns // 10)]
            heads = [_huge_headers(srv.http_port, 100_000) for _ in range(3 if quick else 10)]
            bombs = [_send_bomb(srv.url, bomb) for _ in range(3 if quick else 10)]
            results = await asyncio.gather(asyncio.gather(*loris), asyncio.gather(*bodies),
                                           asyncio.gather(*heads), asyncio.gather(*bombs))
            return results[0], results[1], results[2], results[3]

        loris, bodies, heads, bombs = asyncio.run(abuse())
        sampling.set()
        sampler.join()
        normal.phase = "after"
        time.sleep(2)
        rss_after = srv.rss_mb()
        normal.stop.set()
        normal.join()
        alive = srv.alive()
    before, during = _pct(normal.lat["before"], 0.99) * 1e3, _pct(normal.lat["during"], 0.99) * 1e3
    cut_loris = sum(1 for status, waited in loris if status in ("408", "closed", "reset") and waited <= header_s + 3)
    cut_bodies = sum(1 for status, waited in bodies if status == "408" and waited <= body_s + 3)
    refused_heads = sum(1 for s in heads if s in ("431", "reset", "closed"))
    refused_bombs = sum(1 for s in bombs if s == "413/2013")
    rss_peak = max(peak)
    bounded = rss_peak - rss_before < 300 and rss_after - rss_before < 50
    unaffected = during <= 2 * before + 10 and normal.errors == 0
    all_cut = (cut_loris == len(loris) and cut_bodies == len(bodies) and refused_heads == len(heads)
               and refused_bombs == len(bombs))
    return Row(f"slow clients: {len(loris)} slowloris connections (headers at 1 B/s), {len(bodies)} bodies at "
               f"1 B/s, {len(heads)} x 100 k headers, {len(bombs)} gzip bombs ({len(bomb) >> 10} KiB -> 1 GiB)",
               "server RSS before / peak / after; normal client's p99 before -> during",
               "bounded; unaffected (p99 <= 2x + 10 ms, no errors)",
               f"{rss_before:.0f} / {rss_peak:.0f} / {rss_after:.0f} MB; {before:.1f} -> {during:.1f} ms",
               bounded and unaffected and all_cut and alive,
               f"header_timeout_s {header_s:g}, body_timeout_s {body_s:g}: slowloris cut {cut_loris}/{len(loris)}, "
               f"bodies 408 {cut_bodies}/{len(bodies)}, 100 k headers refused {refused_heads}/{len(heads)} "
               f"({sorted(set(heads))}), bombs 413 {refused_bombs}/{len(bombs)} ({sorted(set(bombs))}); "
               f"normal client {sum(len(v) for v in normal.lat.values())} requests, {normal.errors} errors")


RUNNERS: dict[str, Callable[[bool, Path], Row]] = {
    "schema": case_schema, "grpc-fuzz": case_grpc_fuzz, "auth": case_auth, "slow": case_slow}


def run(quick: bool, only: set[str] | None = None) -> list[Row]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="inhouse-abuse-") as tmp:
        root = Path(tmp)
        make_repo(root)
        for name, fn in RUNNERS.items():
            if only and name not in only:
                continue
            started = time.monotonic()
            rows.append(fn(quick, root))
            print(f"[abuse {name}: {time.monotonic() - started:.0f} s] {rows[-1].detail}", file=sys.stderr,
                  flush=True)
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default="", help=f"comma-separated: {', '.join(sorted(CASES))}")
    args = parser.parse_args()
    print(render(run(args.quick, {s for s in args.only.split(",") if s} or None)))
