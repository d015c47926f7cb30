"""Following one completion's log to its end: the loop every surface's event stream runs, with its own renderer.

Subscribers never get a queue of their own: each keeps a cursor into ``StreamState.log.pieces`` and
waits for more (docs/architecture.md, "Slow clients: coalescing, not queues"). What differs
between surfaces is only what bytes a stretch of pieces becomes, and what opens and ends the
stream; that is the ``Renderer``.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from ..metrics import Metrics
from ..state import StreamState

UNBATCHED = sys.maxsize
"""``Renderer.batch`` of a renderer that takes whatever piled up in one go (it coalesces it)."""


class Renderer(Protocol):
    """One stream's bytes, rendered from its completion's state; the surfaces implement it."""

    state: StreamState
    start: int
    """The first piece to render (a resumed stream starts past the pieces its client has seen)."""
    batch: int
    """At most this many pieces per ``advance`` (a long backlog is then not rendered in one go)."""

    def opening(self) -> bytes:
        """What the stream opens with (b"" for nothing); one write."""
        ...

    def advance(self, start: int, end: int) -> Sequence[bytes]:
        """The events of pieces ``start:end``, each counted in ``oss_sse_events_total`` (none: empty)."""
        ...

    def ending(self) -> bytes:
        """Once the completion has ended and every piece was rendered: the finish, or the error; one write."""
        ...


async def follow(
    renderer: Renderer,
    metrics: Metrics,
    *,
    max_events: int = 0,
    on_early_close: Callable[[], None] | None = None,
    on_close: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """The stream's bytes, live until the completion ends: opening, the events as pieces arrive, ending.

    Everything that arrived since the last wake-up is rendered at once (the renderer may coalesce
    it into one event), so a slow client gets fewer, larger writes rather than an unbounded queue.

    ``max_events`` (test-only) cuts the stream short after that many writes, without its ending,
    to simulate a dropped connection. ``on_early_close`` (a POST stream: cancel downstream) is
    called when the iterator is closed or ends before its ending was yielded: the client left.
    ``on_close`` is called whenever it ends or is closed.

    The client-gone handling is here rather than in a second generator wrapped around this one
    (``guarded``, before): every async generator layer is one more resumption per event on the
    loop, where 1,000 streams x 30 tokens/s in step mode were spending ~31 us per event against
    the raw SSE app's ~18 us (benchmarks/README.md, "Step mode"). For the same reason the
    renderer's methods are looked up once, and each event is one call into it.
    """
    finished = False
    try:
        state = renderer.state
        sent = 0
        opening = renderer.opening()
        if opening:
            yield opening
            sent = 1
        cursor = renderer.start
        batch = renderer.batch
        advance = renderer.advance
        count = metrics.events.inc
        while True:
            end = len(state.log.pieces)
            if cursor < end:
                if end - cursor > batch:
                    end = cursor + batch
                events = advance(cursor, end)
                cursor = end
                for event in events:
                    count()
                    yield event
                    if max_events:
                        sent += 1
                        if sent >= max_events:
                            return
                continue
            if state.done:
                break
            await state.wait(cursor)
        ending = renderer.ending()
        # Set before the last yield: closed there (its send failed), the completion has ended anyway,
        # so a cancel would find nothing to stop.
        finished = True
        yield ending
    finally:
        if not finished and on_early_close is not None:
            on_early_close()
        if on_close is not None:
            on_close()
