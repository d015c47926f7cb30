"""/v1/messages (Anthropic Messages API): create (JSON or SSE) and count_tokens.

The request becomes the same parts and metadata as a chat completion (``messages_request``), the
completion is the same ``StreamState``; what differs is the shape: a ``message`` object with
content blocks, and a stream of named events (docs/architecture.md, "Anthropic Messages API"):

    message_start, ping, (content_block_start, content_block_delta..., content_block_stop)...,
    message_delta, message_stop

Text is one block until a tool call starts; each tool call is a block of its own (its arguments
as ``input_json_delta``); text after a call opens a new block. A failure after the headers is an
``event: error``; there is no ``[DONE]``. Tool-use ids are the node's call ids, unchanged, so a
``tool_result`` sent back names the call the node made. Every error on these paths is
Anthropic-shaped (``anthropic_errors``).
"""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from typing import Any, ClassVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part, ToolCallDelta

from ..anthropic_errors import error_event, error_response
from ..errors import ChatCompletionError, InvalidRequest, NotFound
from ..metrics import Metrics
from ..sse import named_event
from ..state import Status, StreamState
from .common import end_error, read_body
from .dispatch import prompt_tokens, sampling_metadata
from .messages_request import MessagesRequest, PromptRequest, parse_count_tokens_request, parse_messages_request
from .surface import Surface
from .tools import tool_metadata

SURFACE = "messages"

STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "content_filter": "refusal"}
"""The node's ``finish_reason`` -> Anthropic's ``stop_reason``. ``stop`` is ``end_turn`` unless the node's
finish chunk named the stop string that ended the text (``stop_sequence``, docs/architecture.md, "Dora wire
protocol"): then ``stop_sequence``, with that string as the message's ``stop_sequence`` (``stop_reason``)."""

PING = named_event("ping", {"type": "ping"})
"""Sent once after ``message_start``, as Anthropic does; a quiet stream also gets the ``: ping`` comment."""


def new_message_id() -> str:
    return "msg_" + secrets.token_hex(12)


def stop_reason(finish_reason: str | None, stop_sequence: str | None = None) -> str:
    reason = finish_reason or "stop"
    if reason == "stop" and stop_sequence:
        return "stop_sequence"
    return STOP_REASONS.get(reason, "end_turn")


def stop_fields(state: StreamState) -> dict[str, Any]:
    """``stop_reason`` and ``stop_sequence`` of a finished message (``stop_sequence`` null unless one ended it)."""
    sequence = state.stop_sequence if (state.finish_reason or "stop") == "stop" else None
    return {"stop_reason": stop_reason(state.finish_reason, sequence), "stop_sequence": sequence}


def tool_input(arguments: str) -> dict[str, Any]:
    """A call's arguments as the object ``input`` must be; ``{}`` when the node's JSON is not an object."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def usage(state: StreamState) -> dict[str, int]:
    counted = state.usage
    return {
        "input_tokens": counted["prompt_tokens"],
        "output_tokens": counted["completion_tokens"],
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


def _call_id(state: StreamState, delta: ToolCallDelta) -> str:
    """The call's id; a node that sent none gets the one ``StreamState.calls`` makes up."""
    return delta.id or f"call_{state.request_id[-8:]}_{delta.index}"


def content_blocks(state: StreamState) -> list[dict[str, Any]]:
    """The answer as content blocks, in the order they began: text runs and one ``tool_use`` per call."""
    if not state.tool_calls:
        text = state.text
        return [{"type": "text", "text": text}] if text else []
    blocks: list[dict[str, Any]] = []
    by_call: dict[int, dict[str, Any]] = {}
    for delta, text, _ in state.segments(0, len(state.pieces)):
        if delta is None:
            if not text:
                continue
            if blocks and blocks[-1]["type"] == "text":
                blocks[-1]["text"] += text
            else:
                blocks.append({"type": "text", "text": text})
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
        "usage": usage(state) if done else {"input_tokens": state.prompt_tokens, "output_tokens": 0},
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
        self.calls: dict[int, int] = {}
        """Call index -> its block index."""

    def run(self, delta: ToolCallDelta | None, text: str) -> bytes:
        """The events for one run of pieces (``StreamState.segments``)."""
        if delta is None:
            if not text:
                return b""
            opened = b""
            if self.open is None or self.open_call is not None:
                opened = self._start({"type": "text", "text": ""}, None)
            return opened + _delta(self.open, {"type": "text_delta", "text": text})
        block = self.calls.get(delta.index)
        opened = b""
        if block is None:
            call = {"type": "tool_use", "id": _call_id(self.state, delta), "name": delta.name or "", "input": {}}
            opened = self._start(call, delta.index)
            block = self.calls[delta.index] = self.count - 1
        # A call the node resumes after another began (interleaved calls) goes on in its own block.
        return opened + (_delta(block, {"type": "input_json_delta", "partial_json": text}) if text else b"")

    def _start(self, block: dict[str, Any], call: int | None) -> bytes:
        closed = self.close()
        self.open, self.open_call = self.count, call
        self.count += 1
        return closed + named_event(
            "content_block_start", {"type": "content_block_start", "index": self.open, "content_block": block}
        )

    def close(self) -> bytes:
        if self.open is None:
            return b""
        index, self.open, self.open_call = self.open, None, None
        return named_event("content_block_stop", {"type": "content_block_stop", "index": index})


def _delta(index: int | None, delta: dict[str, Any]) -> bytes:
    return named_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})


async def message_events(
    state: StreamState, metrics: Metrics, on_early_close: Callable[[], None] | None = None
) -> AsyncIterator[bytes]:
    """The named events of one message, from ``message_start`` to ``message_stop`` (or ``error``).

    Everything that arrived since the last wake-up goes out in one write (coalesced), as in
    ``chat_stream.chunk_events``. ``on_early_close`` (cancel downstream) is called when the iterator
    is closed or ends before its last event: the client left.
    """
    finished = False
    try:
        yield named_event("message_start", {"type": "message_start", "message": message_body(state, [])}) + PING
        blocks = _Blocks(state)
        cursor = 0
        while True:
            pieces = state.pieces
            end = len(pieces)
            if cursor < end:
                runs = state.segments(cursor, end) if state.tool_calls else [(None, "".join(pieces[cursor:end]), end - 1)]
                cursor = end
                events = b"".join(blocks.run(delta, text) for delta, text, _ in runs)
                if events:
                    metrics.events.inc()
                    yield events
                continue
            if state.done:
                break
            await state.wait(cursor)
        if state.status is Status.COMPLETED:
            ending = {
                "type": "message_delta",
                "delta": stop_fields(state),
                "usage": usage(state),
            }
            last = blocks.close() + named_event("message_delta", ending) + named_event("message_stop", {"type": "message_stop"})
        else:
            last = error_event(end_error(state))
        finished = True  # set before the last yield: closed there, the completion has ended anyway
        yield last
    finally:
        if not finished and on_early_close is not None:
            on_early_close()


_ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
"""A function route answers GET (and HEAD) alone unless given its methods."""


class MethodNotAllowed(ChatCompletionError):
    status, error_type, code = 405, "invalid_request_error", "method_not_allowed"

    ALLOW: ClassVar[str] = "POST"

    def headers(self) -> dict[str, str]:
        return {"Allow": self.ALLOW}


class Messages(Surface):
    """The /v1/messages routes; any other method or path under it gets an Anthropic-shaped 405 or 404."""

    name = SURFACE
    new_id = staticmethod(new_message_id)
    error_response = staticmethod(error_response)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages", self.create, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            # Starlette prefers a full match (path and method) to these, which take everything else.
            Route("/v1/messages", self.unrouted, methods=_ANY_METHOD),
            Route("/v1/messages/{rest:path}", self.unrouted, methods=_ANY_METHOD),
        ]

    async def _create(self, request: Request, message_id: str) -> Response:
        body = parse_messages_request(await read_body(request, self.settings.max_body_bytes))
        model = self.dispatcher.model(body.model)
        metadata = self._tools(body) | sampling_metadata(
            message_id,
            model,
            stream=body.stream,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_sequences,
        )
        state = await self.dispatcher.submit(message_id, self.name, model, body.parts(), metadata)
        headers = {"X-Request-Id": message_id, "request-id": message_id}
        if not body.stream:
            await self.dispatcher.gathered(request, state)
            return JSONResponse(message_body(state), headers=headers)
        await self.dispatcher.first_chunk(request, state)
        events = message_events(state, self.metrics, on_early_close=lambda: self.dispatcher.cancel(message_id))
        return self.sse(events, headers)

    @staticmethod
    def _tools(body: PromptRequest) -> dict[str, Any]:
        """The tools' request metadata (the chat wire form); 400 for a choice no tool can meet."""
        choice = body.tool_choice
        names = {tool.name for tool in body.tools or ()}
        if choice is not None and choice.type == "any" and not names:
            raise InvalidRequest("tool_choice 'any' needs at least one tool in 'tools'", param="tool_choice.type")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise InvalidRequest(f"tool_choice names the tool '{choice.name}', which is not in 'tools'", param="tool_choice.name")
        openai_choice = None if choice is None else choice.openai()
        return tool_metadata(body.function_tools(), openai_choice, body.parallel_tool_calls, choice_param=body.choice_param)

    async def count_tokens(self, request: Request) -> Response:
        """The server's estimate of the prompt's tokens: the parts (system included) and the tools' JSON."""
        try:
            body = parse_count_tokens_request(await read_body(request, self.settings.max_body_bytes))
            self.dispatcher.model(body.model)
            tools = self._tools(body).get("tools")
        except ChatCompletionError as error:
            return error_response(error)
        parts = body.parts() + ([Part("system", "text", tools)] if tools else [])
        return JSONResponse({"input_tokens": prompt_tokens(parts)})

    async def unrouted(self, request: Request) -> Response:
        if request.url.path in ("/v1/messages", "/v1/messages/count_tokens"):
            return error_response(MethodNotAllowed(f"Method {request.method[:20]} is not allowed here; use POST."))
        return error_response(NotFound(f"Not found: {request.url.path[:200]!r}."))


__all__ = ["Messages", "MessagesRequest", "message_body", "message_events"]
