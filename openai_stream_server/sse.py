"""The bytes of the ``chat.completion.chunk`` stream, preformatted.

Why not ``ServerSentEvent`` per chunk: sse-starlette cost about 4x the CPU
per event of writing preformatted ``data:`` bytes (~15 us against ~3.5 us;
docs/architecture.md, "Facts measured", and benchmarks/README.md). ``sse_response.SseResponse`` writes these bytes and keeps the
disconnect watch and pings that ``EventSourceResponse`` used to provide;
``tests/unit/test_sse.py`` checks that the bytes parse the same as the
library's and as the openai SDK's decoder expects.

POST streams carry no ``id:`` lines: the SDK's decoder keeps the last ``id:``
and turns a later comment ping into an empty event that fails to parse
(docs/architecture.md, HTTP API). Reattach streams (``resumable=True``) carry
``id: <seq>`` and ``sequence_number`` so that ``EventSource`` resumes.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ChatCompletionError

DONE = b"data: [DONE]\n\n"
PING = b": ping\n"
"""A single comment line, no blank line after: every parser tested ignores it (docs/architecture.md)."""


def error_event(error: ChatCompletionError) -> bytes:
    return b"data: " + error.to_json() + b"\n\n"


class ChunkEncoder:
    """Renders one completion's chunks; the constant parts of the JSON are built once per stream."""

    __slots__ = ("_head", "_tail", "_resumable", "include_usage", "relay_sent_at")

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
        head = orjson.dumps({"id": request_id, "object": "chat.completion.chunk", "created": created, "model": model})[:-1]
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

    def role(self) -> bytes:
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

    def finish(self, finish_reason: str, seq: int | None = None, usage: dict[str, Any] | None = None) -> bytes:
        choices = b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":' + orjson.dumps(finish_reason)
        if usage is not None and self._resumable:  # reattach streams: usage rides on the finish chunk
            return self._event(seq, choices + b'}],"usage":' + orjson.dumps(usage) + b"}\n\n")
        return self._event(seq, choices + b"}]" + self._tail)

    def usage(self, usage: dict[str, Any], seq: int | None = None) -> bytes:
        return self._event(seq, b',"choices":[],"usage":' + orjson.dumps(usage) + b"}\n\n")
