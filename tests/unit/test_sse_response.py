"""``SseResponse``: the pure-ASGI event-stream response (sse_response.py) driven with hand-written receive/send."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from openai_stream_server.sse import PING
from openai_stream_server.sse_response import SseResponse

pytestmark = pytest.mark.timeout(10)


class Client:
    """An ASGI peer: records what is sent; ``leave()`` makes ``receive`` report a disconnect."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self._gone = asyncio.Event()

    async def receive(self) -> dict[str, Any]:
        await self._gone.wait()
        return {"type": "http.disconnect"}

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def leave(self) -> None:
        self._gone.set()

    @property
    def body(self) -> bytes:
        return b"".join(m.get("body", b"") for m in self.sent if m["type"] == "http.response.body")


def scope(method: str = "POST") -> dict[str, Any]:
    return {"type": "http", "method": method}


async def test_streams_every_event_then_ends_the_body() -> None:
    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        yield b"data: 2\n\n"

    client = Client()
    await SseResponse(events(), headers={"X-Request-Id": "r"}, ping_interval_s=0)(scope(), client.receive, client.send)
    start = client.sent[0]
    headers = dict(start["headers"])
    assert start["status"] == 200 and headers[b"content-type"].startswith(b"text/event-stream")
    assert (
        headers[b"cache-control"] == b"no-store" and headers[b"x-accel-buffering"] == b"no" and headers[b"x-request-id"] == b"r"
    )
    assert client.body == b"data: 1\n\ndata: 2\n\n"
    assert client.sent[-1] == {"type": "http.response.body", "body": b"", "more_body": False}


async def test_client_leaving_a_quiet_stream_closes_the_iterator_at_once() -> None:
    quiet, closed = asyncio.Event(), asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            quiet.set()
            await asyncio.sleep(60)  # a quiet stream: the model thinks
            yield b"data: never\n\n"
        finally:
            closed.set()  # chunk_events sends cancel downstream here

    client = Client()
    response = asyncio.ensure_future(SseResponse(events(), ping_interval_s=0)(scope(), client.receive, client.send))
    await asyncio.wait_for(quiet.wait(), 2)  # the first event is sent and the stream has gone quiet
    assert client.body == b"data: 1\n\n" and not closed.is_set()
    client.leave()
    # Not asyncio.wait_for: on its timeout it cancels the response, which a disconnected stream then ends normally.
    done, _ = await asyncio.wait({response}, timeout=2)
    if not done:
        response.cancel()
    assert done, "the response went on after the client left"
    assert response.result() is None  # ends normally, not with CancelledError
    assert closed.is_set()
    assert b"never" not in client.body


class Pinged(Client):
    """Also notes when each ping arrived (loop time) and sets ``enough`` at the ``wanted``-th ping."""

    def __init__(self, wanted: int) -> None:
        super().__init__()
        self.wanted = wanted
        self.ping_times: list[float] = []
        self.enough = asyncio.Event()

    async def send(self, message: dict[str, Any]) -> None:
        await super().send(message)
        if message.get("body") == PING:
            self.ping_times.append(asyncio.get_running_loop().time())
            if len(self.ping_times) == self.wanted:
                self.enough.set()


async def test_quiet_stream_gets_one_line_pings() -> None:
    """The stream stays quiet until the third ping has been sent, so the count does not depend on the machine's load.

    The next event is ready at once after that ping (its task is woken before any later timer),
    so no fourth ping can come; pings are never closer than the interval.
    """
    interval = 0.02
    client = Pinged(wanted=3)

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        await asyncio.wait_for(client.enough.wait(), 5)  # quiet: only pings keep the connection busy
        yield b"data: 2\n\n"

    await SseResponse(events(), ping_interval_s=interval)(scope(), client.receive, client.send)
    assert client.body == b"data: 1\n\n" + PING * 3 + b"data: 2\n\n"
    gaps = [b - a for a, b in zip(client.ping_times, client.ping_times[1:], strict=False)]
    assert all(gap >= interval * 0.95 for gap in gaps), gaps  # a ping only after a quiet interval


async def test_head_gets_headers_and_no_body() -> None:
    touched = False

    async def events() -> AsyncIterator[bytes]:
        nonlocal touched
        touched = True
        yield b"data: 1\n\n"

    client = Client()
    await SseResponse(events())(scope("HEAD"), client.receive, client.send)
    assert client.sent[0]["type"] == "http.response.start" and client.body == b"" and not touched


async def test_cancelled_by_the_server_is_not_swallowed() -> None:
    quiet = asyncio.Event()

    async def events() -> AsyncIterator[bytes]:
        yield b"data: 1\n\n"
        quiet.set()
        await asyncio.sleep(60)
        yield b"data: 2\n\n"

    client = Client()
    response = asyncio.ensure_future(SseResponse(events(), ping_interval_s=0)(scope(), client.receive, client.send))
    await asyncio.wait_for(quiet.wait(), 2)  # streaming, and waiting inside the iterator
    response.cancel()
    with pytest.raises(asyncio.CancelledError):
        await response
