"""The Responses API's JSON object and event stream, rendered from one ``StreamState``.

The events of a response and their ``sequence_number`` are a pure function of the state, so a
stream resumed with ``starting_after=N`` gets exactly the events the first one would have sent
after N, with the same numbers (docs/architecture.md, "Responses API"). For an answer that is
text only (no tool-call pieces) they are:

====================  ==========================================================
``0``                 ``response.created`` (status ``queued`` in background, else ``in_progress``)
``1``                 ``response.in_progress``
``2``                 ``response.output_item.added`` (the one assistant message)
``3``                 ``response.content_part.added`` (its one ``output_text`` part)
``4 + i``             ``response.output_text.delta`` of piece ``i`` (empty pieces: an empty delta)
``4 + n`` … ``6 + n`` ``response.output_text.done``, ``content_part.done``, ``output_item.done``
``7 + n``             ``response.completed``, ``response.incomplete`` (finish ``length``) or
                      ``response.failed`` (failed, and cancelled: its ``response.status`` says which)
====================  ==========================================================

where ``n`` is the number of pieces. With tool calls the pieces are split into output items in
order of appearance (``OutputWalk``): a run of answer text is a ``message`` item, each call a
``function_call`` item; an item opens with its ``added`` events where its first piece is, each
piece is one delta event, and an item closes with its ``done`` events where the next item opens
(or at the end). The numbering is still a running count over the pieces, so still a pure
function of them. Deltas are never coalesced here (the chat stream joins what piled up into one
event): joining would make the numbering depend on when a reader woke up. A slow reader
therefore gets one event per chunk; that costs more per token than chat's coalesced events on a
backlog (not measured). No ``id:`` lines and no ``[DONE]``, as OpenAI streams them.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from openai_stream_protocol import Part, ToolCall

from ..metrics import Metrics
from ..sse import named_event
from ..state import Status, StreamState
from .common import end_error

HEAD = 4
"""Events before the first delta of a text answer: created, in_progress, output_item.added, content_part.added."""

OPENING = 2
"""Events before the first item: created, in_progress."""

BATCH = 256
"""At most this many pieces are walked (and their events rendered) before the stream yields them."""


@dataclass(frozen=True, slots=True)
class Echo:
    """The request fields a response object echoes back, kept on the state (``StreamState.context``)."""

    instructions: str | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    previous_response_id: str | None = None
    background: bool = False
    store: bool = True
    instruction_parts: int = 0
    """How many leading parts of ``StreamState.parts`` are the instructions (not carried over by a continuation)."""
    input_from: int = 0
    """Where this request's own input starts in ``StreamState.parts`` (after the instructions and what
    ``previous_response_id`` carried over): what ``GET .../input_items`` lists."""
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The request's function tools, Responses-shaped (``{"type": "function", "name", ...}``)."""
    tool_choice: str | dict[str, Any] = "auto"
    parallel_tool_calls: bool = True


def message_id(response_id: str, nth: int = 0) -> str:
    """The ``nth`` output message's id (0: the first, usually the only one): derived from the response's, so that
    every rendering agrees."""
    base = "msg_" + response_id.removeprefix("resp_")
    return base if nth == 0 else f"{base}_{nth}"


def function_call_item_id(response_id: str, index: int) -> str:
    """The output item id of the response's call ``index`` (the node's ``tool_call_index``)."""
    return f"fc_{response_id.removeprefix('resp_')}_{index}"


def response_status(state: StreamState, echo: Echo) -> str:
    """``queued`` (background, nothing generated yet), ``in_progress``, ``completed``, ``incomplete`` (finish
    ``length``), ``failed`` or ``cancelled``."""
    if state.status is Status.IN_PROGRESS:
        return "queued" if echo.background and not state.pieces else "in_progress"
    if state.status is Status.COMPLETED:
        return "incomplete" if state.finish_reason == "length" else "completed"
    return state.status.value  # failed, cancelled


def _item_status(status: str) -> str:
    return {"completed": "completed", "queued": "in_progress", "in_progress": "in_progress"}.get(status, "incomplete")


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    """An assistant message item; ``text`` None: no content part yet (as ``output_item.added`` has it)."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [output_text(text)],
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


@dataclass(slots=True)
class Item:
    """One output item and the pieces it spans: from ``first`` to ``end`` (the piece that opened the next item;
    None while it is the last one)."""

    kind: str
    """``message`` or ``function_call``."""
    output_index: int
    id: str
    first: int
    end: int | None = None
    call: int = -1
    """A function call's index (the node's ``tool_call_index``)."""
    call_id: str = ""
    name: str = ""


class OutputWalk:
    """A response's output items and its events' sequence numbers, found by walking its pieces in order.

    Answer text opens a ``message`` item unless one is open; a tool-call piece of a call not seen
    yet opens its ``function_call`` item. Opening an item closes the one before. Empty text while no
    message is open is held back: it joins the message that non-empty text opens next, is dropped
    when a call comes first (an answer of calls only has no message item, as OpenAI's), and at the
    end of an answer that has no item at all it opens the message (so an answer of text only has
    the events it always had, empty pieces or not). A piece of a call whose item was closed already (the node
    interleaved its calls) is a delta on that item. Everything here depends only on the pieces
    walked, so the events and numbers of a replay or resume are those of the first stream.

    ``advance`` and ``finish`` return the rendered events numbered above ``last`` (none when it is
    ``sys.maxsize``: the walk then only finds the items, for the response object).
    """

    __slots__ = ("state", "renderer", "last", "seq", "cursor", "items", "current", "held", "by_call", "messages", "out")

    def __init__(self, state: StreamState, renderer: EventRenderer | None = None, last: int = sys.maxsize) -> None:
        self.state = state
        self.renderer = renderer
        self.last = last
        self.seq = OPENING
        self.cursor = 0
        self.items: list[Item] = []
        self.current: Item | None = None
        self.held: int | None = None
        """The first of the empty text pieces held back, if any are."""
        self.by_call: dict[int, Item] = {}
        self.messages = 0
        self.out: list[bytes] = []

    # -- walking -----------------------------------------------------------------

    def advance(self, end: int) -> list[bytes]:
        """Walk pieces ``cursor:end``; the events they make."""
        self.out = []
        state = self.state
        pieces, calls = state.pieces, state.tool_calls
        i = self.cursor
        while i < end:
            delta = calls.get(i) if calls else None
            current = self.current
            if delta is None:
                if current is not None and current.kind == "message":
                    if not calls:  # text only so far: every piece to ``end`` is a delta (the common path)
                        self._text_deltas(current, i, end)
                        i = end
                        break
                    self._text_deltas(current, i, i + 1)
                elif not pieces[i]:
                    if self.held is None:
                        self.held = i
                else:
                    start = i if self.held is None else self.held
                    self._open_message(start)
                    self._text_deltas(self.current, start, i + 1)  # type: ignore[arg-type]
                i += 1
                continue
            self.held = None
            item = self.by_call.get(delta.index)
            if item is None:
                item = self._open_call(i, delta.index, delta.id, delta.name)
            self._argument_delta(item, i)
            i += 1
        self.cursor = max(self.cursor, end)
        return self.out

    def finish(self) -> list[bytes]:
        """Once the state has ended and every piece was walked: close the last item, then the terminal event."""
        self.out = []
        state = self.state
        end = len(state.pieces)
        if not self.items:  # no pieces, or only empty ones: the text answer's message, as ever
            start = end if self.held is None else self.held
            self._open_message(start)
            self._text_deltas(self.current, start, end)  # type: ignore[arg-type]
        self.held = None
        assert self.renderer is not None, "a walk that renders nothing has no end events"
        body = response_body(state, self.renderer.echo)
        status = body["status"]
        self._close(_item_status(status), end)
        terminal = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status, "response.failed")
        self._emit(terminal, response=body)
        return self.out

    # -- items ---------------------------------------------------------------------

    def _wanted(self) -> bool:
        """Whether the next event is to be rendered (numbered above ``last``)."""
        return self.seq > self.last and self.renderer is not None

    def _emit(self, kind: str, **fields: Any) -> None:
        if self.seq > self.last and self.renderer is not None:
            self.out.append(self.renderer.event(kind, self.seq, **fields))
        self.seq += 1

    def _open(self, item: Item) -> None:
        if self.current is not None:
            self._close("completed", item.first)
        self.items.append(item)
        self.current = item

    def _open_message(self, first: int) -> None:
        item = Item("message", len(self.items), message_id(self.state.request_id, self.messages), first)
        self.messages += 1
        self.held = None
        self._open(item)
        self._emit("response.output_item.added", output_index=item.output_index, item=message_item(item.id, "in_progress", None))
        part = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
        self._emit("response.content_part.added", **part, part=output_text(""))

    def _open_call(self, first: int, index: int, call_id: str | None, name: str | None) -> Item:
        rid = self.state.request_id
        item = Item(
            "function_call",
            len(self.items),
            function_call_item_id(rid, index),
            first,
            call=index,
            call_id=call_id or f"call_{rid[-8:]}_{index}",
            name=name or "",
        )
        self.by_call[index] = item
        self._open(item)
        added = function_call_item(item.id, item.call_id, item.name, "", "in_progress")
        self._emit("response.output_item.added", output_index=item.output_index, item=added)
        return item

    def _close(self, status: str, end: int) -> None:
        item = self.current
        if item is None:
            return
        item.end = end
        self.current = None
        count = 3 if item.kind == "message" else 2
        if self.renderer is None or self.seq + count - 1 <= self.last:  # none of its events to render: only count them
            self.seq += count
            return
        if item.kind == "message":
            text = self.text(item)
            part = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
            self._emit("response.output_text.done", **part, text=text, logprobs=[])
            self._emit("response.content_part.done", **part, part=output_text(text))
            self._emit("response.output_item.done", output_index=item.output_index, item=message_item(item.id, status, text))
            return
        arguments = self.arguments(item, end)
        self._emit(
            "response.function_call_arguments.done",
            item_id=item.id,
            output_index=item.output_index,
            name=item.name,
            arguments=arguments,
        )
        done = function_call_item(item.id, item.call_id, item.name, arguments, status)
        self._emit("response.output_item.done", output_index=item.output_index, item=done)

    def _text_deltas(self, item: Item, start: int, end: int) -> None:
        renderer = self.renderer
        first = self.seq
        if renderer is not None and end > start:
            pieces = self.state.pieces
            for i in range(max(start, start + self.last - first + 1), end):
                self.out.append(renderer.text_delta(item, first + i - start, pieces[i]))
        self.seq = first + end - start

    def _argument_delta(self, item: Item, i: int) -> None:
        if self._wanted():
            self.out.append(self.renderer.argument_delta(item, self.seq, self.state.pieces[i]))  # type: ignore[union-attr]
        self.seq += 1

    # -- reading items -----------------------------------------------------------

    def text(self, item: Item) -> str:
        """A message item's text: the answer text pieces of its span."""
        state = self.state
        end = len(state.pieces) if item.end is None else item.end
        calls = state.tool_calls
        if not calls:
            return "".join(state.pieces[item.first : end])
        return "".join(state.pieces[i] for i in range(item.first, end) if i not in calls)

    def arguments(self, item: Item, end: int | None = None) -> str:
        """A call's arguments: its pieces before ``end`` (None: all of them)."""
        state = self.state
        calls, pieces = state.tool_calls, state.pieces
        stop = len(pieces) if end is None else end
        return "".join(pieces[i] for i in range(item.first, stop) if (d := calls.get(i)) is not None and d.index == item.call)

    def output(self, status: str) -> list[dict[str, Any]]:
        """The output items walked so far: closed ones ``completed``, the last one by the response's ``status``."""
        items = []
        for item in self.items:
            item_status = "completed" if item is not self.items[-1] else _item_status(status)
            if item.kind == "message":
                items.append(message_item(item.id, item_status, self.text(item)))
            else:
                items.append(function_call_item(item.id, item.call_id, item.name, self.arguments(item), item_status))
        return items

    def call(self, item: Item) -> ToolCall:
        return ToolCall(item.call_id, item.name, self.arguments(item))


def walked(state: StreamState) -> OutputWalk:
    """The items of every piece so far (no events rendered)."""
    walk = OutputWalk(state)
    walk.advance(len(state.pieces))
    return walk


def input_item_list(state: StreamState, echo: Echo) -> list[dict[str, Any]]:
    """The request's own input as Responses items, in order: consecutive text and image parts of one role are one
    message, each call of a tool-calls part a ``function_call`` item, each tool result a ``function_call_output``.

    Item ids are derived from the response id and the item's place, so every listing agrees.
    """
    base = state.request_id.removeprefix("resp_")
    items: list[dict[str, Any]] = []

    def next_id(prefix: str) -> str:
        return f"{prefix}_{base}_in{len(items)}"

    for part in state.parts[echo.input_from :]:
        if part.kind == "tool_calls":
            for call in part.calls():
                items.append(function_call_item(next_id("fc"), call.id, call.name, call.arguments, "completed"))
            continue
        if part.role == "tool":
            output = {"type": "function_call_output", "call_id": part.tool_call_id or "", "output": part.content}
            items.append({"id": next_id("fco"), **output, "status": "completed"})
            continue
        if part.role == "assistant":
            content = output_text(part.content)
        elif part.kind == "image":
            content = {"type": "input_image", "image_url": part.content, "detail": "auto"}
        else:
            content = {"type": "input_text", "text": part.content}
        last = items[-1] if items else None
        if last is not None and last["type"] == "message" and last["role"] == part.role:
            last["content"].append(content)
        else:
            items.append(
                {"id": next_id("msg"), "type": "message", "role": part.role, "status": "completed", "content": [content]}
            )
    return items


def answer_parts(state: StreamState) -> list[Part]:
    """The answer as the assistant parts of a continued conversation (``previous_response_id``): each message's
    text, and each run of function calls as one tool-calls part."""
    if not state.tool_calls:
        return [Part("assistant", "text", state.text)]
    walk = walked(state)
    parts: list[Part] = []
    run: list[ToolCall] = []
    for item in walk.items:
        if item.kind == "function_call":
            run.append(walk.call(item))
            continue
        if run:
            parts.append(Part.of_tool_calls(run))
            run = []
        parts.append(Part("assistant", "text", walk.text(item)))
    if run:
        parts.append(Part.of_tool_calls(run))
    return parts


def response_body(state: StreamState, echo: Echo, *, status: str | None = None) -> dict[str, Any]:
    """The ``response`` object. ``status`` given: the opening snapshot of a stream (no output, no usage)."""
    opening = status is not None
    if status is None:
        status = response_status(state, echo)
    error = None
    if not opening and state.status in (Status.FAILED, Status.CANCELLED):
        err = end_error(state)
        error = {"code": err.code or "server_error", "message": err.message}
    usage = None
    if not opening and state.done:
        used = state.usage
        usage = {
            "input_tokens": used["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": used["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": used["total_tokens"],
        }
    if opening:
        output: list[dict[str, Any]] = []
    elif not state.tool_calls:
        output = [message_item(message_id(state.request_id), _item_status(status), state.text)]
    else:
        output = walked(state).output(status)
    return {
        "id": state.request_id,
        "object": "response",
        "created_at": state.created,
        "status": status,
        "background": echo.background,
        "error": error,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": echo.instructions,
        "max_output_tokens": echo.max_output_tokens,
        "metadata": echo.metadata,
        "model": state.model,
        "output": output,
        "parallel_tool_calls": echo.parallel_tool_calls,
        "previous_response_id": echo.previous_response_id,
        "store": echo.store,
        "temperature": echo.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": echo.tool_choice,
        "tools": echo.tools,
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


class EventRenderer:
    """One response's events, each a ``named_event`` with ``type`` and ``sequence_number``."""

    __slots__ = ("state", "echo")

    def __init__(self, state: StreamState, echo: Echo) -> None:
        self.state = state
        self.echo = echo

    @staticmethod
    def event(kind: str, seq: int, **fields: Any) -> bytes:
        return named_event(kind, {"type": kind, "sequence_number": seq, **fields})

    def opening(self) -> list[bytes]:
        """Events 0 and 1: fixed, whatever the state is by the time they are rendered."""
        state, echo = self.state, self.echo
        return [
            self.event(
                "response.created", 0, response=response_body(state, echo, status="queued" if echo.background else "in_progress")
            ),
            self.event("response.in_progress", 1, response=response_body(state, echo, status="in_progress")),
        ]

    def text_delta(self, item: Item, seq: int, text: str) -> bytes:
        return self.event(
            "response.output_text.delta",
            seq,
            item_id=item.id,
            output_index=item.output_index,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def argument_delta(self, item: Item, seq: int, text: str) -> bytes:
        return self.event(
            "response.function_call_arguments.delta", seq, item_id=item.id, output_index=item.output_index, delta=text
        )


async def response_events(
    renderer: EventRenderer,
    metrics: Metrics,
    *,
    after: int | None = None,
    on_close: Callable[[], None] | None = None,
) -> AsyncIterator[bytes]:
    """The events with ``sequence_number`` above ``after`` (None: all), live until the response ends.

    ``on_close`` runs when the iterator ends or is closed (the client left): a POST stream cancels
    a response still in flight there, and forgets one with ``store: false``.
    """
    state = renderer.state
    last = -1 if after is None else after
    walk = OutputWalk(state, renderer, last)
    try:
        for seq, event in enumerate(renderer.opening()):
            if seq > last:
                yield event
        while True:
            end = len(state.pieces)
            if walk.cursor < end:  # a bounded batch at a time: a long backlog is not rendered all at once
                for event in walk.advance(min(end, walk.cursor + BATCH)):
                    metrics.events.inc()
                    yield event
                continue
            if state.done:
                break
            await state.wait(walk.cursor)
        for event in walk.finish():
            yield event
    finally:
        if on_close is not None:
            on_close()
