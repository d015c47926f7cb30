"""A message rendered: the Anthropic ``message`` object, and its stream of named events for ``follow.follow``.

    message_start, ping, (content_block_start, content_block_delta..., content_block_stop)...,
    message_delta, message_stop

Text is one block until a tool call starts; each tool call is a block of its own (its arguments
as ``input_json_delta``); text after a call opens a new block. Reasoning is a ``thinking`` block
(``thinking_delta``, then one ``signature_delta`` before its stop) wherever the node's reasoning runs
are, so before the text (docs/architecture.md, "Reasoning"). A failure after the headers is an
``event: error``; there is no ``[DONE]``. Tool-use ids are the node's call ids, unchanged, so a
``tool_result`` sent back names the call the node made (docs/architecture.md, "Anthropic Messages API").
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from typing import Any

from openai_stream_protocol import ToolCallDelta

from ...answer_log import ReasoningRun, fallback_call_id
from ...anthropic_errors import error_event
from ...sse import named_event
from ...state import Status, StreamState
from ..common import end_error
from ..follow import UNBATCHED

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
"""The node's ``finish_reason`` -> Anthropic's ``stop_reason``. ``stop`` is ``end_turn`` unless the node's
finish chunk named the stop string that ended the text (``stop_sequence``, docs/architecture.md, "Dora wire
protocol"): then ``stop_sequence``, with that string as the message's ``stop_sequence`` (``stop_reason``)."""

PING = named_event("ping", {"type": "ping"})
"""Sent once after ``message_start``, as Anthropic does; a quiet stream also gets the ``: ping`` comment."""


def stop_reason(finish_reason: str | None, stop_sequence: str | None = None) -> str:
    reason = finish_reason or "stop"
    if reason == "stop" and stop_sequence:
        return "stop_sequence"
    return STOP_REASONS.get(reason, "end_turn")


def stop_fields(state: StreamState) -> dict[str, Any]:
    """``stop_reason`` and ``stop_sequence`` of a finished message (``stop_sequence`` null unless one ended it)."""
    sequence = state.log.stop_sequence if (state.log.finish_reason or "stop") == "stop" else None
    return {"stop_reason": stop_reason(state.log.finish_reason, sequence), "stop_sequence": sequence}


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object ``input`` must be; ``{}`` when the node's JSON is not an object."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def usage(state: StreamState) -> dict[str, int]:
    counted = state.log.usage
    return {
        "input_tokens": counted["prompt_tokens"],
        "output_tokens": counted["completion_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def signature(message_id: str, index: int) -> str:
    """A thinking block's ``signature``: opaque to clients, which send it back with the block; derived from the
    message id and the block's index so that the object and every stream agree."""
    return base64.urlsafe_b64encode(f"{message_id}/{index}".encode()).decode()


def content_blocks(state: StreamState) -> list[dict[str, Any]]:
    """The answer as content blocks, in the order they began: thinking and text runs, and one ``tool_use`` per call."""
    log = state.log
    if not log.tool_calls and not log.reasoning:
        text = log.text
        return [{"type": "text", "text": text}] if text else []
    blocks: list[dict[str, Any]] = []
    by_call: dict[int, dict[str, Any]] = {}
    for delta, text, _ in log.segments(0, len(log.pieces)):
        if delta is None or isinstance(delta, ReasoningRun):
            if not text:
                continue
            kind = "text" if delta is None else "thinking"  # a block's type is also the key of its text
            if blocks and blocks[-1]["type"] == kind:
                blocks[-1][kind] += text
            elif kind == "text":
                blocks.append({"type": "text", "text": text})
            else:
                blocks.append({"type": "thinking", "thinking": text, "signature": signature(state.request_id, len(blocks))})
        elif delta.index not in by_call:
            by_call[delta.index] = {"type": "tool_use", "id": "", "name": "", "input": {}}
            blocks.append(by_call[delta.index])
    for index, call in zip(sorted(by_call), state.calls(), strict=True):
        by_call[index].update(id=call.id, name=call.name, input=tool_input(call.arguments))
    return blocks


def message_body(state: StreamState, content: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The ``message`` object: the whole answer, or (``content=[]``, ``message_start``) its opening."""
    done = content is None
    return {
        "id": state.request_id,
        "type": "message",
        "role": "assistant",
        "model": state.model,
        "content": content_blocks(state) if content is None else content,
        **(stop_fields(state) if done else {"stop_reason": None, "stop_sequence": None}),
        "usage": usage(state) if done else {"input_tokens": state.log.prompt_tokens, "output_tokens": 0},
    }


class _Blocks:
    """The stream's content blocks: which is open, and the events that open, fill and close them."""

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.count = 0
        self.open: int | None = None
        """The index of the open block, None between blocks."""
        self.open_call: int | None = None
        """The call index when the open block is a ``tool_use``."""
        self.open_kind: str | None = None
        """The open block's type: ``text``, ``thinking`` or ``tool_use``."""
        self.calls: dict[int, int] = {}
        """Call index -> its block index."""

    def run(self, delta: ToolCallDelta | ReasoningRun | None, text: str) -> bytes:
        """The events for one run of pieces (``AnswerLog.segments``)."""
        if delta is None:
            if not text:
                return b""
            opened = b""
            if self.open_kind != "text":
                opened = self._start({"type": "text", "text": ""}, None)
            return opened + _delta(self.open, {"type": "text_delta", "text": text})
        if isinstance(delta, ReasoningRun):
            if not text:
                return b""
            opened = b""
            if self.open_kind != "thinking":
                opened = self._start({"type": "thinking", "thinking": "", "signature": ""}, None)
            return opened + _delta(self.open, {"type": "thinking_delta", "thinking": text})
        block = self.calls.get(delta.index)
        opened = b""
        if block is None:
            call_id = delta.id or fallback_call_id(self.state.request_id, delta.index)
            call = {"type": "tool_use", "id": call_id, "name": delta.name or "", "input": {}}
            opened = self._start(call, delta.index)
            block = self.calls[delta.index] = self.count - 1
        # A call the node resumes after another began (interleaved calls) goes on in its own block.
        return opened + (_delta(block, {"type": "input_json_delta", "partial_json": text}) if text else b"")

    def _start(self, block: dict[str, Any], call: int | None) -> bytes:
        closed = self.close()
        self.open, self.open_call, self.open_kind = self.count, call, block["type"]
        self.count += 1
        return closed + named_event(
            "content_block_start", {"type": "content_block_start", "index": self.open, "content_block": block}
        )

    def close(self) -> bytes:
        if self.open is None:
            return b""
        index, kind = self.open, self.open_kind
        self.open, self.open_call, self.open_kind = None, None, None
        stop = named_event("content_block_stop", {"type": "content_block_stop", "index": index})
        if kind == "thinking":  # as Anthropic: the block's signature comes last, before its stop
            return _delta(index, {"type": "signature_delta", "signature": signature(self.state.request_id, index)}) + stop
        return stop


def _delta(index: int | None, delta: dict[str, Any]) -> bytes:
    return named_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


class MessageRenderer:
    """One message's named events for ``follow.follow``, from ``message_start`` to ``message_stop`` (or ``error``).

    Everything that arrived since the last wake-up goes out in one write (coalesced).
    """

    __slots__ = ("state", "blocks")

    start = 0
    batch = UNBATCHED

    def __init__(self, state: StreamState) -> None:
        self.state = state
        self.blocks = _Blocks(state)

    def opening(self) -> bytes:
        return named_event("message_start", {"type": "message_start", "message": message_body(self.state, [])}) + PING

    def advance(self, start: int, end: int) -> Sequence[bytes]:
        log = self.state.log
        runs = log.segments(start, end) if log.tool_calls or log.reasoning else [(None, "".join(log.pieces[start:end]), end - 1)]
        events = b"".join(self.blocks.run(delta, text) for delta, text, _ in runs)
        return (events,) if events else ()

    def ending(self) -> bytes:
        state = self.state
        if state.status is not Status.COMPLETED:
            return error_event(end_error(state))
        ending = {"type": "message_delta", "delta": stop_fields(state), "usage": usage(state)}
        return self.blocks.close() + named_event("message_delta", ending) + named_event("message_stop", {"type": "message_stop"})
