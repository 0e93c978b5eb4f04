"""What rendering a chat costs: llama-server's ``/apply-template`` (its own Jinja engine) against
the same GGUF template rendered in process by Jinja2 (``backends/chat_template.py``), with
``/health`` and ``/tokenize`` beside it, so the HTTP round trip itself is seen apart from the
rendering. llama-server runs with inhouse's child flags (``--jinja`` among them); calls alternate
between a new connection and a kept-alive one.

    .venv/bin/python bench/llamacpp_template.py [--gguf FILE] [--llama-server PATH] [--n 100] [--words 57]

The GGUF defaults to the peer harness's tiny-42m q8_0 (``../shared/peerbench``: ``llm_peers.py setup``).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from inhouse.backends.chat_template import verified
from inhouse.backends.llamacpp import find_llama_server

PB = Path(os.environ.get("PEERBENCH_DIR") or "/tmp/peerbench")
WORDS = ["the", "model", "serves", "requests", "on", "a", "private", "server", "with", "low", "latency", "and"]


def _call(sock: socket.socket, method: str, path: str, body: Any = None, close: bool = False) -> tuple[float, bytes]:
    payload = json.dumps(body).encode() if body is not None else b""
    started = time.perf_counter()
    sock.sendall(b"%s %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        method.encode(), path.encode(), len(payload), b"Connection: close\r\n" if close else b"", payload))
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        head, sep, rest = data.partition(b"\r\n\r\n")
        if sep:
            length = [int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")]
            if length and len(rest) >= length[0]:
                if b"connection: close" in head.lower():  # cpp-httplib ends a connection after 100 calls
                    sock.close()
                return time.perf_counter() - started, rest[:length[0]]
    sock.close()
    return time.perf_counter() - started, data.partition(b"\r\n\r\n")[2]


def _connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=PB / "llm" / "gguf" / "tiny-42m-q8_0.gguf")
    ap.add_argument("--llama-server", type=Path, default=None)
    ap.add_argument("--n", type=int, default=100, help="calls of each kind")
    ap.add_argument("--words", type=int, default=57, help="words in the chat's user turn")
    args = ap.parse_args()
    binary = find_llama_server(args.llama_server)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        log = (Path(tmp) / "llama-server.log").open("wb")
        proc = subprocess.Popen([str(binary), "--model", str(args.gguf), "--ctx-size", "4096", "--parallel", "1",
                                 "--kv-unified", "--jinja", "--no-webui", "--metrics", "--threads", "2",
                                 "--host", "127.0.0.1", "--port", str(port)], stdout=log, stderr=log)
        try:
            base = f"http://127.0.0.1:{port}"
            for _ in range(600):
                try:
                    with urllib.request.urlopen(base + "/health", timeout=1):
                        break
                except OSError:
                    time.sleep(0.1)
            with urllib.request.urlopen(base + "/props") as r:
                props = json.loads(r.read())

            def server_render(messages: list[dict[str, Any]]) -> str:
                with _connect(port) as c:
                    _, body = _call(c, "POST", "/apply-template", {"messages": messages, "add_generation_prompt": True},
                                    close=True)
                return str(json.loads(body)["prompt"])

            local, why = verified(props.get("chat_template"), str(props.get("bos_token") or ""),
                                  str(props.get("eos_token") or ""), server_render)
            print(f"{args.gguf.name}: in-process rendering {'on' if local else 'off'} ({why})")
            rng = random.Random(0)
            times: dict[str, list[float]] = {}
            kept = _connect(port)
            for i in range(args.n):
                chat = [{"role": "user", "content": f"{i} " + " ".join(rng.choice(WORDS) for _ in range(args.words))}]
                calls = [("/health", "GET", None), ("/tokenize", "POST", {"content": chat[0]["content"]}),
                         ("/apply-template", "POST", {"messages": chat, "add_generation_prompt": True})]
                for path, method, body in calls:
                    with _connect(port) as fresh:
                        took = _call(fresh, method, path, body, True)[0]
                    times.setdefault(f"{path}, new connection", []).append(took)
                    if kept.fileno() < 0:
                        kept = _connect(port)
                    times.setdefault(f"{path}, kept alive", []).append(_call(kept, method, path, body)[0])
                if local is not None:
                    started = time.perf_counter()
                    text = local.render(chat)
                    times.setdefault("Jinja2 in process", []).append(time.perf_counter() - started)
                    if i == 0 and text != server_render(chat):
                        print("  (differs from llama-server on this chat)")
            kept.close()
        finally:
            proc.terminate()
            proc.wait(30)
    for label, ts in times.items():
        p50, p90 = statistics.median(ts) * 1000, sorted(ts)[int(len(ts) * 0.9)] * 1000
        print(f"  {label:34} p50 {p50:7.3f} ms   p90 {p90:7.3f} ms")


if __name__ == "__main__":
    main()
