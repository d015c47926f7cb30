"""``OutputWalk``: a response's output items and its events' sequence numbers, found by walking its pieces in order."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Protocol

from openai_stream_protocol import Part, ToolCall

from ...answer_log import fallback_call_id
from ...state import StreamState
from .items import (
    function_call_item,
    function_call_item_id,
    item_status,
    message_id,
    message_item,
    output_text,
    reasoning_id,
    reasoning_item,
    reasoning_text,
)

OPENING = 2
"""Events before the first item: created, in_progress."""


class EventSink(Protocol):
    """What a walk renders its events with (``render.ResponseRenderer``)."""

    def event(self, kind: str, seq: int, **fields: Any) -> bytes: ...

    def text_delta(self, item: Item, seq: int, text: str) -> bytes: ...

    def argument_delta(self, item: Item, seq: int, text: str) -> bytes: ...

    def reasoning_delta(self, item: Item, seq: int, text: str) -> bytes: ...

    def body(self) -> dict[str, Any]:
        """The response object as it is now (the terminal event carries it)."""
        ...


@dataclass(slots=True)
class Item:
    """One output item and the pieces it spans: from ``first`` to ``end`` (the piece that opened the next item;
    None while it is the last one)."""

    kind: str
    """``message``, ``function_call`` or ``reasoning``."""
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
    yet opens its ``function_call`` item; reasoning opens a ``reasoning`` item unless one is open.
    Opening an item closes the one before. Empty text while no message is open is held back: it
    joins the message that non-empty text opens next, is dropped when a call or reasoning comes
    first (an answer of calls only has no message item, as OpenAI's), and at the end of an answer
    that has no item at all it opens the message (so an answer of text only has the events it
    always had, empty pieces or not). Empty reasoning while no reasoning item is open opens none and
    renders nothing. A piece of a call whose item was closed already (the node interleaved its
    calls) is a delta on that item. Everything here depends only on the pieces walked, so the
    events and numbers of a replay or resume are those of the first stream.

    ``advance`` and ``finish`` return the rendered events numbered above ``last`` (none when it is
    ``sys.maxsize``: the walk then only finds the items, for the response object).
    """

    __slots__ = (
        "state", "renderer", "last", "seq", "cursor", "items", "current", "held", "by_call", "messages", "thoughts", "out",
    )  # fmt: skip

    def __init__(self, state: StreamState, renderer: EventSink | None = None, last: int = sys.maxsize) -> None:
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
        self.thoughts = 0
        """Reasoning items opened so far (their ids count them)."""
        self.out: list[bytes] = []

    # -- walking -----------------------------------------------------------------

    def advance(self, end: int) -> list[bytes]:
        """Walk pieces ``cursor:end``; the events they make."""
        self.out = []
        state = self.state
        pieces, calls, thoughts = state.log.pieces, state.log.tool_calls, state.log.reasoning
        i = self.cursor
        while i < end:
            delta = calls.get(i) if calls else None
            current = self.current
            if delta is None and thoughts and i in thoughts:
                self.held = None
                if current is not None and current.kind == "reasoning":
                    self._reasoning_delta(current, i)
                elif pieces[i]:
                    self._reasoning_delta(self._open_reasoning(i), i)
                i += 1
                continue
            if delta is None:
                if current is not None and current.kind == "message":
                    if not calls and not thoughts:  # text only so far: every piece to ``end`` is a delta (the common path)
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
        end = len(state.log.pieces)
        if not self.items:  # no pieces, or only empty ones: the text answer's message, as ever
            start = end if self.held is None else self.held
            self._open_message(start)
            self._text_deltas(self.current, start, end)  # type: ignore[arg-type]
        self.held = None
        assert self.renderer is not None, "a walk that renders nothing has no end events"
        body = self.renderer.body()
        status = body["status"]
        self._close(item_status(status), end)
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

    def _open_reasoning(self, first: int) -> Item:
        item = Item("reasoning", len(self.items), reasoning_id(self.state.request_id, self.thoughts), first)
        self.thoughts += 1
        self._open(item)
        added = reasoning_item(item.id, "in_progress", None)
        self._emit("response.output_item.added", output_index=item.output_index, item=added)
        part = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
        self._emit("response.content_part.added", **part, part=reasoning_text(""))
        return item

    def _open_call(self, first: int, index: int, call_id: str | None, name: str | None) -> Item:
        rid = self.state.request_id
        item = Item(
            "function_call",
            len(self.items),
            function_call_item_id(rid, index),
            first,
            call=index,
            call_id=call_id or fallback_call_id(rid, index),
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
        count = 2 if item.kind == "function_call" else 3
        if self.renderer is None or self.seq + count - 1 <= self.last:  # none of its events to render: only count them
            self.seq += count
            return
        if item.kind == "reasoning":
            text = self.reasoning(item)
            part = {"item_id": item.id, "output_index": item.output_index, "content_index": 0}
            self._emit("response.reasoning_text.done", **part, text=text)
            self._emit("response.content_part.done", **part, part=reasoning_text(text))
            self._emit("response.output_item.done", output_index=item.output_index, item=reasoning_item(item.id, status, text))
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
            pieces = self.state.log.pieces
            for i in range(max(start, start + self.last - first + 1), end):
                self.out.append(renderer.text_delta(item, first + i - start, pieces[i]))
        self.seq = first + end - start

    def _reasoning_delta(self, item: Item, i: int) -> None:
        if self._wanted():
            self.out.append(self.renderer.reasoning_delta(item, self.seq, self.state.log.pieces[i]))  # type: ignore[union-attr]
        self.seq += 1

    def _argument_delta(self, item: Item, i: int) -> None:
        if self._wanted():
            self.out.append(self.renderer.argument_delta(item, self.seq, self.state.log.pieces[i]))  # type: ignore[union-attr]
        self.seq += 1

    # -- reading items -----------------------------------------------------------

    def text(self, item: Item) -> str:
        """A message item's text: the answer text pieces of its span."""
        log = self.state.log
        end = len(log.pieces) if item.end is None else item.end
        calls, thoughts = log.tool_calls, log.reasoning
        if not calls and not thoughts:
            return "".join(log.pieces[item.first : end])
        return "".join([log.pieces[i] for i in range(item.first, end) if i not in calls and i not in thoughts])

    def reasoning(self, item: Item) -> str:
        """A reasoning item's text: the reasoning pieces of its span."""
        log = self.state.log
        end = len(log.pieces) if item.end is None else item.end
        thoughts = log.reasoning
        return "".join([log.pieces[i] for i in range(item.first, end) if i in thoughts])

    def arguments(self, item: Item, end: int | None = None) -> str:
        """A call's arguments: its pieces before ``end`` (None: all of them)."""
        state = self.state
        calls, pieces = state.log.tool_calls, state.log.pieces
        stop = len(pieces) if end is None else end
        return "".join(pieces[i] for i in range(item.first, stop) if (d := calls.get(i)) is not None and d.index == item.call)

    def output(self, status: str) -> list[dict[str, Any]]:
        """The output items walked so far: closed ones ``completed``, the last one by the response's ``status``."""
        items = []
        for item in self.items:
            own = "completed" if item is not self.items[-1] else item_status(status)
            if item.kind == "message":
                items.append(message_item(item.id, own, self.text(item)))
            elif item.kind == "reasoning":
                items.append(reasoning_item(item.id, own, self.reasoning(item)))
            else:
                items.append(function_call_item(item.id, item.call_id, item.name, self.arguments(item), own))
        return items

    def call(self, item: Item) -> ToolCall:
        return ToolCall(item.call_id, item.name, self.arguments(item))


def walked(state: StreamState) -> OutputWalk:
    """The items of every piece so far (no events rendered)."""
    walk = OutputWalk(state)
    walk.advance(len(state.log.pieces))
    return walk


def answer_parts(state: StreamState) -> list[Part]:
    """The answer as the assistant parts of a continued conversation (``previous_response_id``): each message's
    text, and each run of function calls as one tool-calls part. Reasoning is not carried over (thinking
    templates drop it from the history too)."""
    if not state.log.tool_calls:
        return [Part("assistant", "text", state.log.text)]
    walk = walked(state)
    parts: list[Part] = []
    run: list[ToolCall] = []
    for item in walk.items:
        if item.kind == "reasoning":
            continue
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
