"""A chat completion rendered: the ``chat.completion`` object, and its ``chat.completion.chunk`` stream, preformatted.

POST streams carry no ``id:`` lines: the SDK's decoder keeps the last ``id:``
and turns a later comment ping into an empty event that fails to parse
(docs/architecture.md, HTTP API). Reattach streams (``resumable=True``) carry
``id: <seq>`` and ``sequence_number`` so that ``EventSource`` resumes.

A reasoning model's reasoning goes in ``delta.reasoning_content`` / ``message.reasoning_content``
(DeepSeek's name), ``reasoning`` (vLLM's) or both, by ``--reasoning-field``; its usage then has
``completion_tokens_details.reasoning_tokens`` (docs/architecture.md, "Reasoning").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import orjson

from openai_stream_protocol import ToolCallDelta

from ...answer_log import REASONING, AnswerLog
from ...sse import DONE, error_event
from ...state import Status, StreamState
from ..common import end_error
from ..follow import UNBATCHED
from ..tools import call_dict


def reasoning_keys(reasoning_field: str) -> tuple[str, ...]:
    """The message and delta keys a reasoning model's reasoning goes in, for ``--reasoning-field``."""
    return ("reasoning_content", "reasoning") if reasoning_field == "both" else (reasoning_field,)


def chat_usage(log: AnswerLog) -> dict[str, Any]:
    """The usage object: with ``completion_tokens_details.reasoning_tokens`` when the answer reasoned.

    An answer without reasoning keeps the three counts alone, byte for byte what it was before reasoning existed.
    """
    usage: dict[str, Any] = log.usage
    if log.reasoning or log.reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": log.reasoning_used}
    return usage


def completion_body(state: StreamState, reasoning_field: str = "reasoning_content") -> dict[str, Any]:
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
                "message": _message(state, reasoning_field),
                "logprobs": None,
                "finish_reason": state.log.finish_reason,
            }
        ],
        "usage": chat_usage(state.log),
        "status": state.status.value,
    }
    if state.service_tier is not None:  # the tier it was served at, as OpenAI says (docs/team.md, "Queue and tiers")
        body["service_tier"] = state.service_tier
    if state.status in (Status.FAILED, Status.CANCELLED):
        body["error"] = end_error(state).to_dict()["error"]
    return body


def _message(state: StreamState, reasoning_field: str) -> dict[str, Any]:
    """The assistant message: its text, its reasoning when it had any, and its tool calls when it made any (content is
    then null if empty)."""
    log = state.log
    message: dict[str, Any] = {"role": "assistant", "content": log.text, "refusal": None}
    if log.reasoning:
        thought = log.reasoning_text
        for key in reasoning_keys(reasoning_field):
            message[key] = thought or None
    if log.tool_calls:
        message["content"] = message["content"] or None
        message["tool_calls"] = [call_dict(call) for call in state.calls()]
    return message


class ChunkEncoder:
    """The bytes of one completion's chunks; the constant parts of the JSON are built once per stream.

    ``completions.render.TextCompletionEncoder`` renders the ``text_completion`` chunks of
    /v1/completions: another ``OBJECT``, no role chunk, the text in ``choices[0].text``.
    """

    __slots__ = (
        "_head", "_tail", "_resumable", "include_usage", "relay_sent_at", "_content_open", "_content_close", "_reasoning_keys",
    )  # fmt: skip

    OBJECT = "chat.completion.chunk"
    CONTENT_HEAD = b',"choices":[{"index":0,"delta":{"content":'
    """A content chunk's choices before the text's JSON string ..."""
    CONTENT_TAIL = b'},"logprobs":null,"finish_reason":null}]'
    """... and after it."""

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        *,
        include_usage: bool = False,
        resumable: bool = False,
        relay_sent_at: bool = False,
        reasoning_field: str = "reasoning_content",
        service_tier: str | None = None,
    ) -> None:
        head = orjson.dumps({"id": request_id, "object": self.OBJECT, "created": created, "model": model})[:-1]
        if service_tier is not None:  # the tier it was served at, as OpenAI's chunks say
            head += b',"service_tier":' + orjson.dumps(service_tier)
        self._head = head + b',"system_fingerprint":null'
        self._tail = b',"usage":null}\n\n' if include_usage else b"}\n\n"
        self._resumable = resumable
        self.include_usage = include_usage
        self.relay_sent_at = relay_sent_at
        self._content_open = b"data: " + self._head + self.CONTENT_HEAD
        self._content_close = self.CONTENT_TAIL + self._tail
        self._reasoning_keys = reasoning_keys(reasoning_field)

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
        """A content chunk: the one event of the common path, so the bytes around the text are built once
        per stream (``_content_open``, ``_content_close``) and joined with it in two concatenations."""
        if (self._resumable and seq is not None) or (sent_at is not None and self.relay_sent_at):
            return self._marked_content(text, seq, sent_at)
        return self._content_open + orjson.dumps(text) + self._content_close

    def _marked_content(self, text: str, seq: int | None, sent_at: float | None) -> bytes:
        # ``x_sent_at`` (benchmarks only, ``relay_sent_at``): the node's send time of the oldest chunk in this event.
        stamp = b',"x_sent_at":' + orjson.dumps(sent_at) if sent_at is not None and self.relay_sent_at else b""
        return self._event(seq, self.CONTENT_HEAD + orjson.dumps(text) + self.CONTENT_TAIL + stamp + self._tail)

    def reasoning(self, text: str, seq: int | None = None) -> bytes | None:
        """A reasoning chunk: the text in ``delta.reasoning_content`` (or ``delta.reasoning``, or both); None where the
        surface has no place for it."""
        return self._event(
            seq,
            b',"choices":[{"index":0,"delta":'
            + orjson.dumps(dict.fromkeys(self._reasoning_keys, text))
            + b',"logprobs":null,"finish_reason":null}]'
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


class ChunkRenderer:
    """The chunk stream of one completion for ``follow.follow``, in ``encoder``'s shape (chat's or /v1/completions').

    From the start, or after sequence number ``after`` (a reattach: pieces are numbered by their
    ``seq``, the finish chunk by the number of pieces). Text that piled up since the last wake-up
    is one content event; with tool calls, each run of one kind (``StreamState.segments``) is one.
    Ends with the finish chunk (and usage chunk) or an error event, then ``[DONE]``. ``retry_ms``
    opens the stream with a data-less ``retry:`` block (no event is dispatched for it) so that an
    ``EventSource`` reconnects sooner than its 3 s default.
    """

    __slots__ = ("state", "encoder", "start", "retry_ms", "_content", "_relay", "_log")

    batch = UNBATCHED

    def __init__(self, state: StreamState, encoder: ChunkEncoder, *, after: int | None = None, retry_ms: int = 0) -> None:
        self.state = state
        self.encoder = encoder
        self.start = 0 if after is None else after + 1
        self.retry_ms = retry_ms
        self._content = encoder.content
        self._relay = encoder.relay_sent_at
        self._log = state.log

    def opening(self) -> bytes:
        retry = b"retry: %d\n\n" % self.retry_ms if self.retry_ms else b""
        role = self.encoder.role() if self.start == 0 else None
        return retry if role is None else retry + role

    def advance(self, start: int, end: int) -> Sequence[bytes]:
        log = self._log
        if log.tool_calls or log.reasoning:  # tool-call deltas or reasoning among them: one event per run
            return self._runs(start, end)
        pieces = log.pieces
        text = pieces[start] if end - start == 1 else "".join(pieces[start:end])
        if not text:
            return ()
        return (self._content(text, end - 1, log.sent_at.get(start) if self._relay else None),)

    def _runs(self, start: int, end: int) -> list[bytes]:
        encoder = self.encoder
        events = []
        for kind, text, last in self._log.segments(start, end):
            if kind is None:
                if text:
                    events.append(encoder.content(text, last))
            elif kind is REASONING:
                event = encoder.reasoning(text, last) if text else None
                if event is not None:
                    events.append(event)
            else:
                events.append(encoder.tool_call(kind, text, last))  # type: ignore[arg-type]
        return events

    def ending(self) -> bytes:
        state = self.state
        if self.start > len(state.log.pieces):  # a reattached client that already saw the end gets only [DONE]
            return DONE
        if state.status is not Status.COMPLETED:
            return error_event(end_error(state)) + DONE
        usage = chat_usage(state.log)
        finish = self.encoder.finish(state.log.finish_reason or "stop", len(state.log.pieces), usage)
        if self.encoder.include_usage:
            return finish + self.encoder.usage(usage) + DONE
        return finish + DONE
