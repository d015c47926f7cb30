"""Between a live completion (``StreamState``) and its record: ``record_of`` writes one, ``state_of`` reads one back.

A state rebuilt from a record is read-only: it has ended (or it mirrors another process's live
completion, fed by ``extend`` from that process's log), it is in no registry's ``active`` table, and
nothing is ever sent downstream for it. Every surface renders it as it renders its own, so GET,
reattach and ``starting_after`` replay it exactly (docs/store.md, "What is written when").
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any

from openai_stream_protocol import Chunk

from ..errors import ApiError
from ..state import ByteLedger, Limits, Status, StreamState
from .base import LogBatch
from .record import CompletionRecord, RecordError


class StoredError(ApiError):
    """An error read back from a record: its type and code as they were, its status that of the error type."""

    def __init__(self, error: RecordError) -> None:
        super().__init__(error.message, param=error.param, code=error.code)
        self.error_type = error.type  # type: ignore[misc]
        self.status = 400 if error.type == "invalid_request_error" else 500  # type: ignore[misc]


def context_json(context: object | None) -> dict[str, Any] | None:
    """A surface's context as JSON-able data: a dataclass as its fields, a dict as it is, anything else dropped."""
    if context is None:
        return None
    if dataclasses.is_dataclass(context) and not isinstance(context, type):
        # shallow: its values are JSON already (orjson encodes them); asdict's deep copy cost ~10x more
        return {f.name: getattr(context, f.name) for f in dataclasses.fields(context)}
    if isinstance(context, dict):
        return context
    return None


def record_of(state: StreamState, *, stored: bool = False) -> CompletionRecord:
    """The record of ``state`` as it is now (opened: no pieces yet; ended: everything)."""
    log = state.log
    error = state.error
    return CompletionRecord(
        id=state.request_id,
        surface=state.surface,
        model=state.model,
        created=state.created,
        status=state.status.value,
        finish_reason=log.finish_reason,
        stop_sequence=log.stop_sequence,
        error=None if error is None else RecordError(error.message, error.error_type, error.code, error.param),
        prompt_tokens=log.prompt_tokens,
        completion_tokens=log.completion_tokens,
        # copies: the record may be encoded later (Redis, a queued write) while a mirror still grows
        pieces=list(log.pieces),
        tool_calls=dict(log.tool_calls),
        reasoning=sorted(log.reasoning),
        reasoning_tokens=log.reasoning_tokens,
        parts=list(state.surface_data.parts),
        context=context_json(state.surface_data.context),
        stored=stored,
        owner=state.owner,
        service_tier=state.service_tier,
    )


UNBOUNDED = Limits(max_buffered_chunks=1, max_completion_bytes=sys.maxsize)
"""A rebuilt state's limits: what it holds was bounded where it ran; here it only has to fit."""


def state_of(record: CompletionRecord, *, ledger: ByteLedger | None = None) -> StreamState:
    """A read-only state holding what ``record`` holds (its pieces, end, usage, parts and context)."""
    state = StreamState(
        record.id, record.model, record.surface, prompt_tokens=record.prompt_tokens, limits=UNBOUNDED, created=record.created,
        ledger=ledger,
    )  # fmt: skip
    if record.parts:
        state.keep_parts(record.parts)
    state.surface_data.context = record.context
    state.owner = record.owner
    state.service_tier = record.service_tier
    finish(state, record)
    return state


def extend(state: StreamState, batch: LogBatch) -> None:
    """Append a batch of another process's live log to a mirror; pieces it already has are skipped."""
    have = len(state.log.pieces)
    skip = have - batch.start
    if skip < 0 or skip >= len(batch.pieces):  # nothing new (or a gap, which ordered batches never leave)
        return
    now = time.monotonic()
    request_id = state.request_id
    calls, thoughts = batch.tool_calls, batch.reasoning
    for seq in range(have, batch.start + len(batch.pieces)):
        piece = batch.pieces[seq - batch.start]
        state.accept(Chunk(request_id, seq, piece, tool_call=calls.get(seq), reasoning=seq in thoughts), now)


def finish(state: StreamState, record: CompletionRecord) -> None:
    """Bring a mirror (or a fresh state) to what ``record`` holds: its pieces past the state's, its usage, its end."""
    extend(state, LogBatch(0, record.pieces, record.tool_calls, set(record.reasoning)))
    log = state.log
    log.prompt_tokens = record.prompt_tokens
    log.completion_tokens = record.completion_tokens
    log.reasoning_tokens = record.reasoning_tokens
    if not record.ended or state.done:
        return
    log.stop_sequence = record.stop_sequence
    log.finish_reason = record.finish_reason
    if record.status == "completed":
        state.restore_end(Status.COMPLETED)
    elif record.status == "cancelled":
        state.cancel()
    else:
        state.fail(StoredError(record.error or RecordError("the completion failed")))
