"""The Responses API's JSON object and event stream, rendered from one ``StreamState``.

The events of a response and their ``sequence_number`` are a pure function of the state, so a
stream resumed with ``starting_after=N`` gets exactly the events the first one would have sent
after N, with the same numbers (docs/architecture.md, "Responses API"):

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

where ``n`` is the number of pieces. Deltas are never coalesced here (the chat stream joins what
piled up into one event): joining would make the numbering depend on when a reader woke up. A slow
reader therefore gets one event per chunk; that costs more per token than chat's coalesced events
on a backlog (not measured). No ``id:`` lines and no ``[DONE]``, as OpenAI streams them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from ..metrics import Metrics
from ..sse import named_event
from ..state import Status, StreamState
from .common import end_error

HEAD = 4
"""Events before the first delta: created, in_progress, output_item.added, content_part.added."""


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


def message_id(response_id: str) -> str:
    """The output message's id: derived from the response's, so that every rendering agrees."""
    return "msg_" + response_id.removeprefix("resp_")


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


def message_item(response_id: str, status: str, text: str | None) -> dict[str, Any]:
    """The assistant message item; ``text`` None: no content part yet (as ``output_item.added`` has it)."""
    return {
        "id": message_id(response_id),
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [output_text(text)],
    }


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
        "output": [] if opening else [message_item(state.request_id, _item_status(status), state.text)],
        "parallel_tool_calls": True,
        "previous_response_id": echo.previous_response_id,
        "store": echo.store,
        "temperature": echo.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": "auto",
        "tools": [],
        "top_p": echo.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": None,
    }


class EventRenderer:
    """One response's events, each a ``named_event`` with ``type`` and ``sequence_number``."""

    __slots__ = ("state", "echo", "item_id")

    def __init__(self, state: StreamState, echo: Echo) -> None:
        self.state = state
        self.echo = echo
        self.item_id = message_id(state.request_id)

    @staticmethod
    def _event(kind: str, seq: int, **fields: Any) -> bytes:
        return named_event(kind, {"type": kind, "sequence_number": seq, **fields})

    def head(self) -> list[bytes]:
        """Events 0 to 3: fixed, whatever the state is by the time they are rendered."""
        state, echo = self.state, self.echo
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        return [
            self._event(
                "response.created", 0, response=response_body(state, echo, status="queued" if echo.background else "in_progress")
            ),
            self._event("response.in_progress", 1, response=response_body(state, echo, status="in_progress")),
            self._event(
                "response.output_item.added", 2, output_index=0, item=message_item(state.request_id, "in_progress", None)
            ),
            self._event("response.content_part.added", 3, **part, part=output_text("")),
        ]

    def delta(self, index: int, text: str) -> bytes:
        """Piece ``index``'s delta, event ``HEAD + index``."""
        return self._event(
            "response.output_text.delta",
            HEAD + index,
            item_id=self.item_id,
            output_index=0,
            content_index=0,
            delta=text,
            logprobs=[],
        )

    def tail(self) -> list[bytes]:
        """The four closing events, numbered from ``HEAD + n``; only once the state has ended."""
        state, echo = self.state, self.echo
        seq = HEAD + len(state.pieces)
        text = "".join(state.pieces)
        body = response_body(state, echo)
        status = body["status"]
        part = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        terminal = {"completed": "response.completed", "incomplete": "response.incomplete"}.get(status, "response.failed")
        return [
            self._event("response.output_text.done", seq, **part, text=text, logprobs=[]),
            self._event("response.content_part.done", seq + 1, **part, part=output_text(text)),
            self._event(
                "response.output_item.done",
                seq + 2,
                output_index=0,
                item=message_item(state.request_id, _item_status(status), text),
            ),
            self._event(terminal, seq + 3, response=body),
        ]


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
    try:
        for seq, event in enumerate(renderer.head()):
            if seq > last:
                yield event
        cursor = max(0, last - HEAD + 1)  # the first piece whose delta comes after ``after``
        while True:
            pieces = state.pieces
            while cursor < len(pieces):
                metrics.events.inc()
                yield renderer.delta(cursor, pieces[cursor])
                cursor += 1
            if state.done:
                break
            await state.wait(cursor)
        for seq, event in enumerate(renderer.tail(), start=HEAD + len(state.pieces)):
            if seq > last:
                yield event
    finally:
        if on_close is not None:
            on_close()
