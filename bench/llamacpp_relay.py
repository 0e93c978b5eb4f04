"""What ``backend: llamacpp`` itself costs, without llama.cpp's compute in the way: inhouse serves a
stand-in ``llama-server`` (this file, run with ``--child``) that answers the native API it relays
— ``/apply-template``, ``/tokenize``, ``/completion`` streamed at a fixed pace — in microseconds,
so the time to the first token is inhouse's own, and the server's CPU per token is the relay's.
Checkouts given with ``--src`` (their ``src`` folders) are served in the same run, rounds
interleaved; the medians are printed.

    .venv/bin/python bench/llamacpp_relay.py --src src --src /tmp/before/src [--rounds 3] [--api completions]
        [--requests 24] [--tokens 128] [--pace-ms 2.5] [--concurrency 1]

The real engine's numbers (and bare llama-server beside it) come from the peer harness
(../shared/peerbench/llm_peers.py); this one isolates what the relay adds on top.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

PROMPT_WORDS = 57


# ---- the stand-in child -------------------------------------------------------------------------
async def _child(sock: str, pace_s: float) -> None:
    key = os.environ.get("LLAMA_API_KEY", "")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            path = lines[0].split(" ")[1]
            headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
            body = json.loads(await reader.readexactly(int(headers.get("content-length", 0))) or b"{}")
            if key and path != "/health" and headers.get("authorization") != f"Bearer {key}":
                await _send(writer, 401, {"error": "bad key"})
            elif path == "/completion" and body.get("stream"):
                await _stream(writer, body, pace_s)
                return
            else:
                await _send(writer, 200, _answer(path, body))
            if headers.get("connection", "").lower() == "close":
                writer.close()
                return

    server = await asyncio.start_unix_server(handle, sock)
    async with server:
        await server.serve_forever()


def _answer(path: str, body: dict[str, Any]) -> dict[str, Any]:
    if path == "/props":
        return {"default_generation_settings": {"n_ctx": 32768}, "chat_template": "", "modalities": {}}
    if path == "/v1/models":
        return {"data": [{"id": "stand-in", "meta": {"n_vocab": 32000}}]}
    if path == "/apply-template":
        return {"prompt": "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>" for m in body["messages"])
                + "<|im_start|>assistant\n"}
    if path == "/tokenize":
        return {"tokens": list(range(len(str(body["content"]).split())))}
    if path == "/detokenize":
        return {"content": " ".join("w" for _ in body["tokens"])}
    if path == "/completion":
        return {"content": "hello", "tokens_evaluated": 2, "tokens_predicted": 2}
    return {}


async def _send(writer: asyncio.StreamWriter, status: int, doc: dict[str, Any]) -> None:
    data = json.dumps(doc).encode()
    writer.write(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                 % (status, len(data), data))
    await writer.drain()


async def _stream(writer: asyncio.StreamWriter, body: dict[str, Any], pace_s: float) -> None:
    prompt = body["prompt"]
    n_prompt = len(prompt.split()) if isinstance(prompt, str) else len(prompt)
    n = int(body.get("n_predict") or 16)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")

    def event(doc: dict[str, Any]) -> None:
        data = b"data: " + json.dumps(doc, separators=(",", ":")).encode() + b"\n\n"
        writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    try:
        if body.get("return_progress"):
            event({"index": 0, "content": "", "tokens": [0], "stop": False, "tokens_predicted": 0,
                   "tokens_evaluated": n_prompt, "prompt_progress": {"total": n_prompt, "cache": 0,
                                                                      "processed": 0, "time_ms": 0}})
        start = time.monotonic()
        for i in range(1, n + 1):
            await asyncio.sleep(max(0.0, start + (i - 1) * pace_s - time.monotonic()))  # the first at once
            event({"index": 0, "content": " tok", "tokens": [100 + i % 50], "stop": False, "tokens_predicted": i,
                   "tokens_evaluated": n_prompt})
            await writer.drain()
        event({"index": 0, "content": "", "tokens": [], "stop": True, "tokens_predicted": n,
               "tokens_evaluated": n_prompt, "stop_type": "limit", "timings": {"cache_n": 0}})
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except ConnectionError:
        pass
    writer.close()


# ---- the load -----------------------------------------------------------------------------------
def _cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def _one(port: int, seed: int, tokens: int, api: str = "chat") -> tuple[float, int]:
    words = " ".join(f"w{(seed * 7 + i) % 97}" for i in range(PROMPT_WORDS))
    if api == "chat":
        path, field = b"/v1/chat/completions", b'"content":" tok"'
        body = json.dumps({"model": "stand-in", "messages": [{"role": "user", "content": words}],
                           "max_tokens": tokens, "temperature": 0, "stream": True}).encode()
    else:
        path, field = b"/v1/completions", b'"text":" tok"'
        body = json.dumps({"model": "stand-in", "prompt": words, "max_tokens": tokens, "temperature": 0,
                           "stream": True}).encode()
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    t0 = time.perf_counter()
    s.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body))
    ttft, seen, buf = 0.0, 0, b""
    while b"[DONE]" not in buf[-64:]:
        data = s.recv(65536)
        if not data:
            break
        new = data.count(field)
        if new and not seen:
            ttft = time.perf_counter() - t0
        seen += new
        buf = buf[-64:] + data
    s.close()
    return ttft, seen


def _round(port: int, pid: int, args: argparse.Namespace, seed: int) -> dict[str, float]:
    async def burst() -> list[tuple[float, int]]:
        return await asyncio.gather(*(asyncio.to_thread(_one, port, seed + i, args.tokens, args.api)
                                      for i in range(args.requests)))

    cpu0, t0 = _cpu(pid), time.perf_counter()
    if args.concurrency > 1:
        results = asyncio.run(burst())
    else:
        results = [_one(port, seed + i, args.tokens, args.api) for i in range(args.requests)]
    wall, cpu = time.perf_counter() - t0, _cpu(pid) - cpu0
    tokens = sum(n for _, n in results)
    return {"ttft_ms": statistics.median(t for t, _ in results) * 1000, "tokens": tokens,
            "cpu_ms_per_token": cpu * 1000 / max(tokens, 1), "cpu_ms_per_request": cpu * 1000 / len(results),
            "tok_s": tokens / wall}


def _serve(src: Path, work: Path, child: Path, port: int) -> subprocess.Popen[bytes]:
    model = work / "repo" / "stand-in"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.gguf").write_bytes(b"GGUF" + bytes(64))
    (model / "model.yaml").write_text("name: stand-in\nbackend: llamacpp\ntask: chat\n"
                                      "llamacpp: {ctx_size: 4096, parallel: 16}\n")
    env = {**os.environ, "PYTHONPATH": str(src), "INHOUSE_LLAMA_SERVER": str(child), "INHOUSE_GRPC__ENABLED": "false"}
    cmd = [sys.executable, "-m", "inhouse", "serve", "--repo", str(work / "repo"), "--http-port", str(port),
           "--data-dir", str(work / "data")]
    return subprocess.Popen(cmd, env=env, cwd=work, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_ready(port: int, proc: subprocess.Popen[bytes]) -> None:
    import urllib.request

    for _ in range(300):
        if proc.poll() is not None:
            sys.exit(f"inhouse exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1) as r:
                if json.loads(r.read()).get("data"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit("inhouse did not become ready")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", type=Path, help="a checkout's src folder (repeatable)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=24)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--pace-ms", type=float, default=2.5, help="the stand-in child's time per token")
    ap.add_argument("--concurrency", type=int, default=1, help="1: one request at a time; N: N at once")
    ap.add_argument("--api", choices=("chat", "completions"), default="chat",
                    help="the OpenAI endpoint the load calls (streamed)")
    args = ap.parse_args()
    sources = [s.resolve() for s in (args.src or [Path(__file__).resolve().parent.parent / "src"])]
    os.environ["STAND_IN_PACE_S"] = str(args.pace_ms / 1000)
    with tempfile.TemporaryDirectory(prefix="llamacpp-relay-") as tmp:
        child = Path(tmp) / "llama-server"
        child.write_text(f"#!/bin/sh\nexec {sys.executable} {Path(__file__).resolve()} \"$@\"\n")
        child.chmod(0o755)
        servers = []
        try:
            for i, src in enumerate(sources):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    port = s.getsockname()[1]
                work = Path(tmp) / f"s{i}"
                work.mkdir()
                servers.append((src, port, _serve(src, work, child, port)))
            for _, port, proc in servers:
                _wait_ready(port, proc)
                _round(port, proc.pid, argparse.Namespace(**{**vars(args), "requests": 4}), 10_000)  # warm-up
            rows: dict[Path, list[dict[str, float]]] = {src: [] for src, _, _ in servers}
            for r in range(args.rounds):
                for src, port, proc in servers if r % 2 == 0 else servers[::-1]:
                    rows[src].append(_round(port, proc.pid, args, 1000 * (r + 1)))
        finally:
            for _, _, proc in servers:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(30)
    print(f"stand-in llama-server, {args.api}: {args.tokens} tokens per request at {args.pace_ms} ms each, "
          f"{args.requests} requests, concurrency {args.concurrency}, {args.rounds} rounds interleaved (medians)")
    for src, rs in rows.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"{src!s:40} TTFT p50 {med['ttft_ms']:6.2f} ms   server CPU {med['cpu_ms_per_token']:.3f} ms/token, "
              f"{med['cpu_ms_per_request']:.2f} ms/request   {med['tok_s']:7.1f} tok/s")


if __name__ == "__main__":
    if "--host" in sys.argv:  # started by inhouse as its llama-server
        asyncio.run(_child(sys.argv[sys.argv.index("--host") + 1], float(os.environ.get("STAND_IN_PACE_S", "0.0025"))))
    else:
        main()
