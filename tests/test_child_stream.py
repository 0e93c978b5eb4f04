"""The streamed POST to an engine child, against a real socket server that answers the way
llama-server and vLLM do (chunked SSE), and the ways a child can go wrong mid-answer."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from inhouse.backends.child_stream import ChildStream, StreamBroken, child_post

Answer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


async def serve(tmp_path: Path, answer: Answer) -> tuple[asyncio.Server, str, list[bytes]]:
    seen: list[bytes] = []
    path = str(tmp_path / "child.sock")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
        seen.append(head + await reader.readexactly(length))
        await answer(reader, writer)
        writer.close()

    return await asyncio.start_unix_server(handle, path), path, seen


async def collect(path: str, body: dict[str, object] | None = None) -> tuple[int, list[dict[str, object]]]:
    async with ChildStream(path, "/completion", body or {"prompt": [1, 2]}, {"Authorization": "Bearer k"}) as s:
        return s.status, [e async for e in s.events()]


SSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


def test_events_split_anywhere_arrive_whole(tmp_path: Path) -> None:
    events = [{"content": f"t{i}", "tokens": [i]} for i in range(50)] + [{"content": "", "stop": True}]
    wire = chunked(*(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events))

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(SSE_HEAD)
        for i in range(0, len(wire), 7):  # 7-byte writes: lines, chunk sizes and CRLFs all split
            w.write(wire[i:i + 7])
            await w.drain()
            await asyncio.sleep(0)

    async def main() -> None:
        server, path, seen = await serve(tmp_path, answer)
        async with server:
            status, got = await collect(path, {"prompt": [1, 2], "n": "ü"})
        assert status == 200 and got == events
        request = seen[0]
        assert request.startswith(b"POST /completion HTTP/1.1\r\n")
        assert b"Authorization: Bearer k\r\n" in request and b"Connection: close\r\n" in request
        assert json.loads(request.split(b"\r\n\r\n", 1)[1]) == {"prompt": [1, 2], "n": "ü"}

    asyncio.run(main())


def test_done_marker_ends_the_events(tmp_path: Path) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(SSE_HEAD + chunked(b'data: {"a": 1}\n\n', b"data: [DONE]\n\n", b'data: {"late": 1}\n\n'))

    async def main() -> None:
        server, path, _ = await serve(tmp_path, answer)
        async with server:
            assert await collect(path) == (200, [{"a": 1}])

    asyncio.run(main())


def test_error_status_body_is_read(tmp_path: Path) -> None:
    body = b'{"error": {"message": "context too long"}}'

    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))

    async def main() -> None:
        server, path, _ = await serve(tmp_path, answer)
        async with server, ChildStream(path, "/completion", {}, {}) as s:
            assert s.status == 400
            assert await s.body() == body.decode()

    asyncio.run(main())


@pytest.mark.parametrize("tail", [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab", b"NOT HTTP AT ALL\r\n\r\n"])
def test_a_broken_answer_raises_instead_of_hanging(tmp_path: Path, tail: bytes) -> None:
    """The child died mid-answer, closed early, or wrote garbage: a clear error, promptly."""
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(tail)

    async def main() -> None:
        server, path, _ = await serve(tmp_path, answer)
        async with server:
            with pytest.raises(StreamBroken):
                async with asyncio.timeout(5):
                    status, _ = await collect(path)
                    if status == 200:  # the short body: the stream itself must end in error
                        pytest.fail("a truncated answer was taken as complete")

    asyncio.run(main())


def test_stream_cut_after_some_events_raises(tmp_path: Path) -> None:
    async def answer(_: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(SSE_HEAD + chunked(b'data: {"content": "a"}\n\n')[:-5])  # then the connection ends: no last chunk

    async def main() -> None:
        server, path, _ = await serve(tmp_path, answer)
        got: list[dict[str, object]] = []
        async with server:
            with pytest.raises(StreamBroken, match="closed"):
                async with ChildStream(path, "/completion", {}, {}) as s:
                    async for e in s.events():
                        got.append(e)
        assert got == [{"content": "a"}]

    asyncio.run(main())


def test_leaving_early_closes_the_connection(tmp_path: Path) -> None:
    """What frees the child's slot: the socket closes as soon as the consumer stops."""
    closed = asyncio.Event()

    async def answer(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(SSE_HEAD)
        while True:
            w.write(chunked(b'data: {"content": "x"}\n\n')[:-5])  # endless chunks
            try:
                await w.drain()
            except ConnectionError:
                break
            if r.at_eof():
                break
            await asyncio.sleep(0.01)
        closed.set()

    async def main() -> None:
        server, path, _ = await serve(tmp_path, answer)
        async with server:
            async with ChildStream(path, "/completion", {}, {}) as s:
                async for _ in s.events():
                    break
            await asyncio.wait_for(closed.wait(), 5)

    asyncio.run(main())


def test_no_child_listening_is_a_clear_error(tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(StreamBroken, match="cannot connect"):
            await collect(str(tmp_path / "absent.sock"))

    asyncio.run(main())


async def keep_alive_server(tmp_path: Path, answers: list[bytes | tuple[bytes] | None]
                            ) -> tuple[asyncio.Server, str, list[int]]:
    """Answers plain calls on kept-alive connections, in order: bytes are written, ``(bytes,)``
    written and the connection closed, None closes it with the request read and not answered.
    ``conns[i]``: the connection (by arrival) that read request i."""
    path = str(tmp_path / "child.sock")
    conns: list[int] = []
    opened = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal opened
        me, opened = opened, opened + 1
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = int(next(h.split(b":")[1] for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")))
            await reader.readexactly(length)
            assert b"Connection: keep-alive\r\n" in head
            conns.append(me)
            answer = answers[len(conns) - 1]
            if answer is None:
                break
            if isinstance(answer, tuple):
                writer.write(answer[0])
                break
            writer.write(answer)
            await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(handle, path), path, conns


def plain(body: bytes, *extra: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\n%sContent-Length: %d\r\n\r\n%s" % (b"".join(extra), len(body), body)


def test_plain_calls_share_one_kept_alive_connection(tmp_path: Path) -> None:
    async def main() -> None:
        server, path, conns = await keep_alive_server(tmp_path, [plain(b'{"n": %d}' % i) for i in range(5)])
        async with server:
            for i in range(5):
                assert await child_post(path, "/apply-template", {"i": i}, {}) == (200, b'{"n": %d}' % i)
        assert conns == [0, 0, 0, 0, 0]

    asyncio.run(main())


def test_a_child_that_says_close_gets_a_new_connection(tmp_path: Path) -> None:
    async def main() -> None:
        server, path, conns = await keep_alive_server(
            tmp_path, [plain(b"a", b"Connection: close\r\n"), plain(b"b"), plain(b"c")])
        async with server:
            for want in (b"a", b"b", b"c"):
                assert await child_post(path, "/x", {}, {}) == (200, want)
        assert conns == [0, 1, 1]

    asyncio.run(main())


def test_a_kept_alive_connection_closed_under_a_call_is_retried_on_a_new_one(tmp_path: Path) -> None:
    """The child may close an idle connection just as a call goes out on it (its keep-alive
    timeout): the call goes again, once, on a fresh connection; the caller sees only the answer."""
    async def main() -> None:
        server, path, conns = await keep_alive_server(tmp_path, [plain(b"a"), None, plain(b"b"), plain(b"c")])
        async with server:
            assert await child_post(path, "/x", {}, {}) == (200, b"a")
            assert await child_post(path, "/x", {}, {}) == (200, b"b")
            assert await child_post(path, "/x", {}, {}) == (200, b"c")
        assert conns == [0, 0, 1, 1]

    asyncio.run(main())


def test_a_fresh_connection_that_breaks_is_not_retried(tmp_path: Path) -> None:
    """Only a reused connection is tried again: a child that drops a call on a new one is failing."""
    async def main() -> None:
        server, path, conns = await keep_alive_server(tmp_path, [None, plain(b"late")])
        async with server:
            with pytest.raises(StreamBroken, match="closed"):
                await child_post(path, "/x", {}, {})
        assert conns == [0]

    asyncio.run(main())


def test_a_call_cut_short_after_part_of_its_answer_is_not_retried(tmp_path: Path) -> None:
    """The child read it and began answering: it may have acted on it, so the error stands."""
    async def main() -> None:
        server, path, conns = await keep_alive_server(
            tmp_path, [plain(b"a"), (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",), plain(b"b")])
        async with server:
            assert await child_post(path, "/x", {}, {}) == (200, b"a")
            with pytest.raises(StreamBroken, match="closed"):
                await child_post(path, "/x", {}, {})
        assert conns == [0, 0]

    asyncio.run(main())
