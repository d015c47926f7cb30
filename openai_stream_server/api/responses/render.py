"""A response rendered: the ``response`` object, and its event stream for ``follow.follow``.

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
(or at the end); reasoning is a ``reasoning`` item of its own, with ``response.reasoning_text.delta``
events (docs/architecture.md, "Reasoning"). The numbering is still a running count over the pieces,
so still a pure function of them. Deltas are never coalesced here (the chat stream joins what piled up into one
event): joining would make the numbering depend on when a reader woke up. A slow reader
therefore gets one event per chunk; that costs more per token than chat's coalesced events on a
backlog (not measured). No ``id:`` lines and no ``[DONE]``, as OpenAI streams them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...sse import named_event
from ...state import Status, StreamState
from ..common import end_error
from .echo import Echo
from .items import item_status, message_id, message_item
from .walk import Item, OutputWalk, walked

BATCH = 256
"""At most this many pieces are walked (and their events rendered) before the stream yields them."""


def response_status(state: StreamState, echo: Echo) -> str:
    """``queued`` (background, nothing generated yet), ``in_progress``, ``completed``, ``incomplete`` (finish
    ``length``), ``failed`` or ``cancelled``."""
    if state.status is Status.IN_PROGRESS:
        return "queued" if echo.background and not state.log.pieces else "in_progress"
    if state.status is Status.COMPLETED:
        return "incomplete" if state.log.finish_reason == "length" else "completed"
    return state.status.value  # failed, cancelled


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
        used = state.log.usage
        usage = {
            "input_tokens": used["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": used["completion_tokens"],
            "output_tokens_details": {"reasoning_tokens": state.log.reasoning_used},
            "total_tokens": used["total_tokens"],
        }
    if opening:
        output: list[dict[str, Any]] = []
    elif not state.log.tool_calls and not state.log.reasoning:
        output = [message_item(message_id(state.request_id), item_status(status), state.log.text)]
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
        "reasoning": {"effort": echo.reasoning_effort, "summary": echo.reasoning_summary},
        "service_tier": state.service_tier,  # the tier it was served at (docs/team.md, "Queue and tiers")
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


def queued_event(state: StreamState, echo: Echo, position: int, first: bool) -> bytes:
    """A waiting stream's place (``queue_position``, an extension field) in a ``response.queued`` event; the first
    one after a ``response.created`` (status ``queued``), which the SDK's stream helper needs before anything else.
    Numbered 0, as the events of the response itself start again from 0 once it is admitted."""
    snapshot = response_body(state, echo, status="queued")
    created = ResponseRenderer.event("response.created", 0, response=snapshot) if first else b""
    return created + ResponseRenderer.event("response.queued", 0, response=snapshot, queue_position=position)


class ResponseRenderer:
    """One response's event stream for ``follow.follow``: each event a ``named_event`` with ``type`` and
    ``sequence_number``, those numbered above ``after`` (None: all of them).

    The numbering is the ``OutputWalk``'s; a stream resumed after N walks every piece again (rendering
    nothing up to N), so it gets exactly the events the first one sent after N.
    """

    __slots__ = ("state", "echo", "last", "walk")

    start = 0
    batch = BATCH

    def __init__(self, state: StreamState, echo: Echo, after: int | None = None) -> None:
        self.state = state
        self.echo = echo
        self.last = -1 if after is None else after
        self.walk = OutputWalk(state, self, self.last)

    # -- the stream (follow.Renderer) ------------------------------------------------

    def opening(self) -> bytes:
        """Events 0 and 1: fixed, whatever the state is by the time they are rendered."""
        state, echo, last = self.state, self.echo, self.last
        opening = b""
        if last < 0:
            status = "queued" if echo.background else "in_progress"
            opening += self.event("response.created", 0, response=response_body(state, echo, status=status))
        if last < 1:
            opening += self.event("response.in_progress", 1, response=response_body(state, echo, status="in_progress"))
        return opening

    def advance(self, start: int, end: int) -> Sequence[bytes]:
        return self.walk.advance(end)

    def ending(self) -> bytes:
        return b"".join(self.walk.finish())

    # -- the events (walk.EventSink) ---------------------------------------------------

    @staticmethod
    def event(kind: str, seq: int, **fields: Any) -> bytes:
        return named_event(kind, {"type": kind, "sequence_number": seq, **fields})

    def body(self) -> dict[str, Any]:
        return response_body(self.state, self.echo)

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

    def reasoning_delta(self, item: Item, seq: int, text: str) -> bytes:
        return self.event(
            "response.reasoning_text.delta", seq, item_id=item.id, output_index=item.output_index, content_index=0, delta=text
        )

    def argument_delta(self, item: Item, seq: int, text: str) -> bytes:
        return self.event(
            "response.function_call_arguments.delta", seq, item_id=item.id, output_index=item.output_index, delta=text
        )
