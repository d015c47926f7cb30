"""``SseResponse`` sends one message at a time: pings and events never overlap in ``send``.

ASGI does not promise that concurrent ``send`` calls are safe; the ping comes from a second task.
The ``send`` here raises if it is entered while another call is still inside it, and it yields to
the loop while inside, as a real transport does when its buffer is full.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.sse import PING
from openai_stream_server.sse_response import SseResponse

pytestmark = pytest.mark.timeout(20)


class OneAtATime:
    """An ASGI peer whose ``send`` takes a while and fails on overlap; ``leave()`` reports a disconnect."""

    def __init__(self, send_s: float) -> None:
        self.send_s = send_s
        self.inside = False
        self.sending: bytes | None = None  # the body inside send() now
        self.overlaps = 0
        self.bodies: list[bytes] = []
        self._gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        if self.inside:
            self.overlaps += 1
            raise RuntimeError("send entered while another send is in flight")
        self.inside = True
        self.sending = message.get("body")
        try:
            await asyncio.sleep(0)
            await asyncio.sleep(self.send_s)
        finally:
            self.inside = False
            self.sending = None
        if message["type"] == "http.response.body":
            self.bodies.append(message["body"])

    def leave(self) -> None:
        self._gone.set()

    @property
    def pings(self) -> int:
        return sum(1 for b in self.bodies if b == PING)


def scope() -> dict[str, Any]:
    return {"type": "http", "method": "POST"}


async def test_pings_never_overlap_an_event_being_sent() -> None:
    """Slow sends and quiet gaps both longer than the ping interval: a ping comes due while an event is in ``send``."""

    async def events() -> AsyncIterator[bytes]:
        for i in range(40):
            await asyncio.sleep(0.004)  # quiet long enough for a ping to come due
            yield b"data: %d\n\n" % i

    peer = OneAtATime(send_s=0.004)
    response = SseResponse(events(), ping_interval_s=0.002)
    await asyncio.wait_for(response(scope(), peer.receive, peer.send), 15)
    assert peer.overlaps == 0
    assert [b for b in peer.bodies if b.startswith(b"data:")] == [b"data: %d\n\n" % i for i in range(40)]
    assert peer.pings > 0  # the pings did run, so the test exercised them
    assert peer.bodies[-1] == b""  # the body was ended after every ping finished


async def test_a_client_leaving_mid_ping_ends_the_stream_cleanly() -> None:
    closed = asyncio.Event()

    async def quiet() -> AsyncIterator[bytes]:
        try:
            yield b"data: first\n\n"
            await asyncio.Event().wait()  # never anything more
            yield b""  # unreachable
        finally:
            closed.set()

    peer = OneAtATime(send_s=0.01)
    task = asyncio.ensure_future(SseResponse(quiet(), ping_interval_s=0.005)(scope(), peer.receive, peer.send))
    await wait_until_async(lambda: peer.sending == PING, 5, interval_s=0.001, what="a ping inside send()")
    peer.leave()  # no await since the check: the ping is still inside send() (it takes send_s)
    assert peer.sending == PING
    await asyncio.wait_for(task, 5)
    assert closed.is_set() and peer.overlaps == 0
    assert peer.bodies[0] == b"data: first\n\n" and set(peer.bodies[1:]) <= {PING, b""}
