"""The streamed answer of the LLM APIs under an ASGI server's send and receive: what a body has
ready goes out in one send, what it waits for does not hold back what came before, and a client
that hangs up (or an error mid-send) unwinds the body, its finally blocks awaited."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import pytest

from inhouse.protocols.llm_http import StreamedAnswer


class Client:
    """The ASGI server's side: ``sent`` is what went out (body bytes, more_body) in order."""

    def __init__(self, hang_up_after_s: float | None = None, fail_on_send: int | None = None) -> None:
        self.sent: list[tuple[bytes, bool]] = []
        self.head: MutableMapping[str, Any] | None = None
        self._hang_up_after_s = hang_up_after_s
        self._fail_on_send = fail_on_send

    async def receive(self) -> dict[str, Any]:
        if self._hang_up_after_s is None:
            await asyncio.Event().wait()
        await asyncio.sleep(self._hang_up_after_s or 0)
        return {"type": "http.disconnect"}

    async def send(self, message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.head = message
            return
        if self._fail_on_send is not None and len(self.sent) == self._fail_on_send:
            await asyncio.sleep(0)  # a send that waits (flow control), then fails
            raise OSError("the client's socket broke")
        self.sent.append((message["body"], message["more_body"]))


async def answer(body: AsyncIterator[bytes], client: Client) -> None:
    await StreamedAnswer(body, "text/event-stream", {})({"type": "http"}, client.receive, client.send)


async def unwinding(cleaned: list[str], first: bytes, pause_s: float) -> AsyncIterator[bytes]:
    """``first``, a wait of ``pause_s``, one more item; its finally awaits before it records
    "closed", as closing an engine stream does."""
    try:
        yield first
        await asyncio.sleep(pause_s)
        yield b"later"
    finally:
        await asyncio.sleep(0)
        cleaned.append("closed")


def test_what_is_ready_goes_in_one_send_and_the_end_with_it() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
        await asyncio.sleep(0.01)
        yield b"c"
        await asyncio.sleep(0.01)
        yield b"d"
        yield b"e"

    client = Client()
    asyncio.run(answer(body(), client))
    assert client.head is not None and client.head["status"] == 200
    assert client.sent == [(b"ab", True), (b"c", True), (b"de", False)]


def test_an_item_the_body_waits_for_does_not_hold_back_the_ones_before() -> None:
    order: list[str] = []
    client = Client()

    async def body() -> AsyncIterator[bytes]:
        yield b"first"
        order.append(f"waiting with {client.sent}")
        await asyncio.sleep(0.05)
        order.append(f"resumed with {client.sent}")
        yield b"second"

    asyncio.run(answer(body(), client))
    # the generator is suspended inside its step when "first" is sent
    assert order == ["waiting with []", "resumed with [(b'first', True)]"]
    assert client.sent == [(b"first", True), (b"second", False)]


def test_a_client_that_hangs_up_closes_a_waiting_body_and_its_finally_runs() -> None:
    cleaned: list[str] = []
    client = Client(hang_up_after_s=0.05)

    async def main() -> float:
        started = asyncio.get_running_loop().time()
        await answer(unwinding(cleaned, b"token", 30), client)  # returns normally: the hangup is not an error
        return asyncio.get_running_loop().time() - started

    assert asyncio.run(main()) < 5
    assert cleaned == ["closed"]
    assert client.sent == [(b"token", True)]


def test_a_send_that_fails_while_the_body_is_mid_step_unwinds_the_body() -> None:
    """The body is suspended inside a step when the send of the items before fails: it gets
    the error there, runs its finally (which awaits), and the error goes on."""
    cleaned: list[str] = []
    client = Client(fail_on_send=0)
    with pytest.raises(OSError, match="broke"):
        asyncio.run(answer(unwinding(cleaned, b"a", 0.05), client))
    assert cleaned == ["closed"]
    assert client.sent == []


def test_what_was_ready_before_a_failure_still_goes_out() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        yield b"b"
        raise RuntimeError("the engine failed")

    client = Client()
    with pytest.raises(RuntimeError, match="engine failed"):
        asyncio.run(answer(body(), client))
    assert client.sent == [(b"ab", True)]


def test_a_cancellation_from_elsewhere_is_not_taken_for_a_hangup() -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b"a"
        await asyncio.sleep(30)
        yield b"b"

    async def main() -> None:
        task = asyncio.ensure_future(answer(body(), Client()))
        await asyncio.sleep(0.05)
        task.cancel()  # a shutdown
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
