"""The floor of any relay written in Python: a uvloop byte pipe from a TCP port to a server behind
it, nothing parsed, nothing rewritten. Put it in the peer harness beside bare ``llama-server`` and
``backend: llamacpp`` (../shared/peerbench/llm_peers.py, one conf line each) to see how much of the
relay's cost is the extra process and hop itself, which no code in inhouse can remove:

    pipe | http://127.0.0.1:{PORT} | llama-server -m {GGUF}-q8_0.gguf ... --port $(({PORT}+7)) &
        exec python bench/byte_pipe.py {PORT} $(({PORT}+7))

Each client connection gets its own upstream connection (with TCP_NODELAY, as llama-server's own
socket has); the upstream may still be starting, so a connection is retried for 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

import uvloop


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


async def _connect(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    end = loop.time() + 30
    while True:
        try:
            return await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            if loop.time() > end:
                raise
            await asyncio.sleep(0.1)


async def _serve(port: int, upstream: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await _connect(upstream)
        except OSError:
            writer.close()
            return
        for w in (writer, up_writer):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pumps = [asyncio.ensure_future(_pump(reader, up_writer)), asyncio.ensure_future(_pump(up_reader, writer))]
        try:  # either side closing closes both, as a server's own close would reach the client
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for p in pumps:
                p.cancel()
            up_writer.close()
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: byte_pipe.py LISTEN_PORT UPSTREAM_PORT")
    uvloop.run(_serve(int(sys.argv[1]), int(sys.argv[2])))
