"""The ``chat.completion.chunk`` stream of one completion, preformatted.

POST streams carry no ``id:`` lines: the SDK's decoder keeps the last ``id:``
and turns a later comment ping into an empty event that fails to parse
(docs/architecture.md, HTTP API). Reattach streams (``resumable=True``) carry
``id: <seq>`` and ``sequence_number`` so that ``EventSource`` resumes.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import orjson

from openai_stream_protocol import ToolCallDelta

from ..metrics import Metrics
from ..sse import DONE, error_event
from ..state import Status, StreamState
from .common import end_error


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
        opening = encoder.role() if after is None else None
        if opening is not None:  # chat's role chunk; /v1/completions has none
            yield opening
            sent += 1
        while True:
            pieces = state.pieces
            end = len(pieces)
            if cursor < end and state.tool_calls:  # tool-call deltas among them: one event per run
                for delta, text, last in state.segments(cursor, end):
                    if delta is None and not text:
                        continue
                    metrics.events.inc()
                    yield encoder.content(text, last) if delta is None else encoder.tool_call(delta, text, last)
                    sent += 1
                cursor = end
                if max_events and sent >= max_events:
                    return
                continue
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


class ChunkEncoder:
    """Renders one completion's chunks; the constant parts of the JSON are built once per stream.

    ``completions.TextCompletionEncoder`` renders the ``text_completion`` chunks of /v1/completions
    for the same ``chunk_events`` loop: another ``OBJECT``, no role chunk, the text in ``choices[0].text``.
    """

    __slots__ = ("_head", "_tail", "_resumable", "include_usage", "relay_sent_at")

    OBJECT = "chat.completion.chunk"

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        *,
        include_usage: bool = False,
        resumable: bool = False,
        relay_sent_at: bool = False,
    ) -> None:
        head = orjson.dumps({"id": request_id, "object": self.OBJECT, "created": created, "model": model})[:-1]
        self._head = head + b',"system_fingerprint":null'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self._resumable = resumable
        self.include_usage = include_usage
        self.relay_sent_at = relay_sent_at

    def _event(self, seq: int | None, body: bytes) -> bytes:
        if self._resumable and seq is not None:
            number = str(seq).encode()
            return b"id: " + number + b"\ndata: " + self._head + b',"sequence_number":' + number + body
        return b"data: " + self._head + body

    def role(self) -> bytes | None:
        """The opening chunk, sent once before the content; None where the surface has none."""
        return self._event(
            None,
            b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,"finish_reason":null}]'
            + self._tail,
        )

    def content(self, text: str, seq: int | None = None, sent_at: float | None = None) -> bytes:
        # ``x_sent_at`` (benchmarks only, ``relay_sent_at``): the node's send time of the oldest chunk in this event.
        stamp = b',"x_sent_at":' + orjson.dumps(sent_at) if sent_at is not None and self.relay_sent_at else b""
        return self._event(
            seq,
            b',"choices":[{"index":0,"delta":{"content":'
            + orjson.dumps(text)
            + b'},"logprobs":null,"finish_reason":null}]'
            + stamp
            + self._tail,
        )

    def tool_call(self, delta: ToolCallDelta, arguments: str, seq: int | None = None) -> bytes:
        """A ``delta.tool_calls`` chunk: id, type and name when ``delta`` starts the call, then argument text."""
        call: dict[str, Any] = {"index": delta.index}
        if delta.id is not None:
            call["id"] = delta.id
            call["type"] = "function"
        function: dict[str, str] = {}
        if delta.name is not None:
            function["name"] = delta.name
        function["arguments"] = arguments
        call["function"] = function
        return self._event(
            seq,
            b',"choices":[{"index":0,"delta":{"tool_calls":['
            + orjson.dumps(call)
            + b']},"logprobs":null,"finish_reason":null}]'
            + self._tail,
        )

    def finish(self, finish_reason: str, seq: int | None = None, usage: dict[str, Any] | None = None) -> bytes:
        choices = b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":' + orjson.dumps(finish_reason)
        if usage is not None and self._resumable:  # reattach streams: usage rides on the finish chunk
            return self._event(seq, choices + b'}],"usage":' + orjson.dumps(usage) + b"}\n\n")
        return self._event(seq, choices + b"}]" + self._tail)

    def usage(self, usage: dict[str, Any], seq: int | None = None) -> bytes:
        return self._event(seq, b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
