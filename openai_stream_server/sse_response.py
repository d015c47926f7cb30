"""A pure-ASGI ``text/event-stream`` response for preformatted events.

Why not sse-starlette's ``EventSourceResponse`` (which this replaced): on
this project's 2-core machine it cost ~15 us of CPU per event against
~3.5 us for a plain ``send`` of the same bytes, and ~490 us per stream
against ~65 us (an anyio task group, four tasks, a cancel scope around
every send); see ``benchmarks/README.md``, "What changed in the server".
That per-stream cost sat in every streamed request's time to first chunk.

What it keeps from sse-starlette, because the server relies on it:

- the client's disconnect is noticed at once (a task waits on ``receive``)
  and ends the stream: the iterator is closed, so ``api.follow.follow`` sends
  ``cancel`` downstream;
- a comment ping on a quiet stream every ``ping_interval_s`` (one line,
  ``sse.PING``, docs/architecture.md: no blank line after it);
- one ``send`` at a time: ASGI does not promise that concurrent ``send``
  calls are safe, and the ping comes from a second task. sse-starlette takes
  a lock around every send; here the stream task marks when it is sending
  (a plain bool, cheaper per event than an ``asyncio.Lock``): the ping task
  starts no ping while it is, and the stream task, once marked, waits for
  the one ping that may be in progress;
- ``Cache-Control: no-store``, ``Connection: keep-alive`` and
  ``X-Accel-Buffering: no``; HEAD gets the headers and no body.

Body messages skip the ``send`` wrappers (``RAW_SEND``): Starlette's
routing and exception middleware, ``ServerErrorMiddleware``, our request
counter and CORS each wrap ``send`` with a function that looks only at
``http.response.start``. The start message still goes through all of them;
every later message goes to the server's own ``send``, which ``middleware.RawSendApp``
puts in the scope. Four wrapper calls cost ~1.5 us per event, where 1,000
streams x 30 tokens/s in step mode were spending ~31 us per event against
the raw SSE app's ~18 us (benchmarks/README.md, "Step mode"). A middleware
that must see or change body messages cannot sit around this response (and
none may: SSE is never gzipped or buffered).

Server shutdown needs nothing here: ``main.serve`` fails every stream in
flight first, so each iterator ends with an error event and ``[DONE]``.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping

from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from .sse import PING

RAW_SEND = "oss.raw_send"
"""Scope key of the server's own ``send``, below every middleware (set by ``middleware.RawSendApp``); optional."""


class SseResponse(Response):
    media_type = "text/event-stream"

    def __init__(
        self,
        events: AsyncIterator[bytes],
        *,
        headers: Mapping[str, str] | None = None,
        ping_interval_s: float = 15.0,
        ping: bytes = PING,
    ) -> None:
        self.events = events
        self.status_code = 200
        self.background = None
        self.ping_interval_s = ping_interval_s
        self.ping = ping
        self.init_headers({"Cache-Control": "no-store", "Connection": "keep-alive", "X-Accel-Buffering": "no", **(headers or {})})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        if scope.get("method") == "HEAD":
            await self._close_events()
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        send = scope.get(RAW_SEND, send)  # the start went through the middleware; the body need not (above)
        loop = asyncio.get_running_loop()
        streaming = asyncio.current_task()
        disconnected = False
        last_write = loop.time()
        sending = False  # the stream task is inside send(): no ping now
        pinging: asyncio.Future[None] | None = None  # a ping is inside send(): the stream task waits for it

        async def watch_disconnect() -> None:
            nonlocal disconnected
            while (await receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            if streaming is not None:
                streaming.cancel()  # wakes the stream wherever it waits; caught below

        async def ping_when_quiet(interval: float) -> None:
            nonlocal last_write, pinging
            while True:
                await asyncio.sleep(max(0.0, last_write + interval - loop.time()))
                if sending:  # an event is on its way (a slow client): not quiet; look again in one interval
                    await asyncio.sleep(interval)
                elif loop.time() - last_write >= interval:
                    pinging = loop.create_future()
                    try:
                        await send({"type": "http.response.body", "body": self.ping, "more_body": True})
                    finally:
                        last_write = loop.time()
                        pinging.set_result(None)
                        pinging = None

        helpers = [asyncio.ensure_future(watch_disconnect())]
        if self.ping_interval_s > 0:
            helpers.append(asyncio.ensure_future(ping_when_quiet(self.ping_interval_s)))
        try:
            try:
                async for event in self.events:
                    sending = True  # first: from here on no ping starts
                    try:
                        if pinging is not None:
                            await asyncio.shield(pinging)  # shielded: leaving must not cancel the ping's own future
                        await send({"type": "http.response.body", "body": event, "more_body": True})
                    finally:
                        sending = False
                    last_write = loop.time()
            finally:
                for helper in helpers:
                    helper.cancel()
                await self._close_events()
            if pinging is not None:  # a cancelled ping may still be inside send()
                await asyncio.shield(pinging)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not disconnected:
                raise
            if streaming is not None:
                streaming.uncancel()  # the client left: a normal end of this response

    async def _close_events(self) -> None:
        aclose = getattr(self.events, "aclose", None)
        if aclose is not None:
            await aclose()
