"""SSE bytes every surface shares: ``[DONE]``, the keep-alive comment, error events, named events.

Why preformatted bytes rather than ``ServerSentEvent`` per chunk: sse-starlette cost about 4x the
CPU per event of writing preformatted ``data:`` bytes (~15 us against ~3.5 us;
docs/architecture.md, "Facts measured", and benchmarks/README.md). ``sse_response.SseResponse``
writes these bytes and keeps the disconnect watch and pings that ``EventSourceResponse`` used to
provide; ``tests/unit/test_sse.py`` checks that the bytes parse the same as the library's and as
the openai SDK's decoder expects.
"""

from __future__ import annotations

from typing import Any

import orjson

from .errors import ApiError

DONE = b"data: [DONE]\n\n"
PING = b": ping\n"
"""A single comment line, no blank line after: every parser tested ignores it (docs/architecture.md)."""


def error_event(error: ApiError) -> bytes:
    """The OpenAI surfaces' error event: the error object as a ``data:`` event (``[DONE]`` follows it)."""
    return b"data: " + error.to_json() + b"\n\n"


def named_event(event: str, data: dict[str, Any]) -> bytes:
    """An ``event: <name>`` + ``data: <json>`` block, as the Responses and Messages APIs stream."""
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"
