"""What one completion looks like on the wire: SSE event iterators and the gathered JSON."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from .errors import Cancelled, ChatCompletionError, UpstreamError
from .metrics import Metrics
from .sse import DONE, ChunkEncoder, error_event
from .state import Status, StreamState


def end_error(state: StreamState) -> ChatCompletionError:
    """The error that ended a failed or cancelled completion."""
    if state.status is Status.CANCELLED:
        return Cancelled("the completion was cancelled")
    return state.error or UpstreamError("the completion failed")


async def chunk_events(
    state: StreamState,
    encoder: ChunkEncoder,
    metrics: Metrics,
    *,
    after: int | None = None,
    max_events: int = 0,
    retry_ms: int = 0,
    on_early_close: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE events of one completion, from the start or after sequence number ``after``.

    Everything that arrived since the last wake-up goes out as one event
    (coalesced), so a slow client gets fewer, larger events rather than an
    unbounded queue. Ends with the finish chunk (and usage chunk) or an error
    event, then ``[DONE]``. ``max_events`` (test-only) cuts the stream short
    without ``[DONE]`` to simulate a dropped connection. ``retry_ms`` opens the
    stream with a data-less ``retry:`` block (no event is dispatched for it) so
    that an ``EventSource`` reconnects sooner than its 3 s default.

    ``on_early_close`` (POST streams: cancel downstream) is called when the
    iterator is closed or ends before ``[DONE]``: the client left. It is
    handled here rather than in a second generator wrapped around this one
    (``guarded``, before): every async generator layer is one more resumption
    per event on the loop, where 1,000 streams x 30 tokens/s in step mode were
    spending ~31 us per event against the raw SSE app's ~18 us
    (benchmarks/README.md, "Step mode").
    """
    finished = False
    try:
        cursor = 0 if after is None else after + 1
        sent = 0
        if retry_ms:
            yield b"retry: %d\n\n" % retry_ms
        if after is None:
            yield encoder.role()
            sent += 1
        while True:
            pieces = state.pieces
            end = len(pieces)
            if cursor < end:
                text = pieces[cursor] if end - cursor == 1 else "".join(pieces[cursor:end])
                oldest = cursor
                cursor = end
                if text:
                    metrics.events.inc()
                    yield encoder.content(text, end - 1, state.sent_at.get(oldest) if encoder.relay_sent_at else None)
                    sent += 1
                    if max_events and sent >= max_events:
                        return
                continue
            if state.done:
                break
            await state.wait(cursor)
        if cursor <= len(state.pieces):  # a reattached client that already saw the end gets only [DONE]
            if state.status is Status.COMPLETED:
                usage = state.usage
                yield encoder.finish(state.finish_reason or "stop", len(state.pieces), usage)
                if encoder.include_usage:
                    yield encoder.usage(usage)
            else:
                yield error_event(end_error(state))
        # Set before the last yield: closed there (its send failed), the completion has ended anyway,
        # so a cancel would find nothing to stop.
        finished = True
        yield DONE
    finally:
        if not finished and on_early_close is not None:
            on_early_close()


def completion_body(state: StreamState) -> dict[str, Any]:
    """The ``chat.completion`` object gathered so far (``status`` is our extension, for GET by id)."""
    body: dict[str, Any] = {
        "id": state.request_id,
        "object": "chat.completion",
        "created": state.created,
        "model": state.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": state.text, "refusal": None},
                "logprobs": None,
                "finish_reason": state.finish_reason,
            }
        ],
        "usage": state.usage,
        "status": state.status.value,
    }
    if state.status in (Status.FAILED, Status.CANCELLED):
        body["error"] = end_error(state).to_dict()["error"]
    return body
