"""A completion to its record and back (openai_stream_server/store/snapshot.py): what a reader sees is the same."""

from __future__ import annotations

import asyncio

import pytest

from openai_stream_protocol import Chunk, Part, ToolCallDelta
from openai_stream_server.errors import UpstreamError
from openai_stream_server.state import Status, StreamState
from openai_stream_server.store.base import LogBatch
from openai_stream_server.store.record import CompletionRecord, decode, encode
from openai_stream_server.store.snapshot import extend, finish, record_of, state_of


def streamed(end: str) -> StreamState:
    state = StreamState("resp_1", "m", "responses", prompt_tokens=5, created=123)
    state.keep_parts([Part("system", "text", "be brief"), Part("user", "text", "hi")])
    state.surface_data.context = {"instructions": "be brief", "input_from": 1}
    call = ToolCallDelta(0, "call_1", "lookup")
    chunks = [
        Chunk("resp_1", 0, "Hel"),
        Chunk("resp_1", 1, "lo"),
        Chunk("resp_1", 2, '{"q":', tool_call=call),
        Chunk("resp_1", 3, ' "x"}', tool_call=ToolCallDelta(0)),
    ]
    for chunk in chunks:
        state.accept(chunk, 1.0)
    if end == "completed":
        state.accept(Chunk("resp_1", 4, "", fin=True, finish_reason="length", completion_tokens=4, stop_sequence=None), 1.0)
    elif end == "failed":
        state.log.finish_reason = "error"
        state.fail(UpstreamError("the node broke", code="node_error"))
    elif end == "cancelled":
        state.cancel()
    return state


def view(state: StreamState) -> tuple[object, ...]:
    error = None if state.error is None else (state.error.message, state.error.error_type, state.error.code)
    return (
        state.request_id, state.model, state.surface, state.created, state.status,
        state.log.pieces, state.log.tool_calls, state.log.finish_reason, state.log.stop_sequence, state.log.usage,
        state.surface_data.parts, state.log.text, state.calls(), error,
    )  # fmt: skip


@pytest.mark.parametrize("end", ["completed", "failed", "cancelled"])
def test_a_rebuilt_state_reads_as_the_original(end: str) -> None:
    original = streamed(end)
    record = decode(encode(record_of(original, stored=True)))
    assert record.stored and record.context == {"instructions": "be brief", "input_from": 1}
    rebuilt = state_of(record)
    assert view(rebuilt) == view(original)
    assert rebuilt.surface_data.context == original.surface_data.context and rebuilt.done


def test_an_opened_record_rebuilds_in_flight_and_a_mirror_follows_the_log() -> None:
    original = StreamState("chatcmpl-1", "m", "chat")
    mirror = state_of(record_of(original))
    assert mirror.status is Status.IN_PROGRESS and mirror.log.pieces == []
    extend(mirror, LogBatch(0, ["a", "b"]))
    extend(mirror, LogBatch(1, ["b", "c"]))  # overlapping: only what is new
    extend(mirror, LogBatch(5, ["x"]))  # a gap: ignored
    assert mirror.log.pieces == ["a", "b", "c"]
    final = CompletionRecord("chatcmpl-1", "chat", "m", 1, status="completed", finish_reason="stop", pieces=["a", "b", "c", "d"])
    finish(mirror, final)
    assert mirror.log.pieces == ["a", "b", "c", "d"] and mirror.status is Status.COMPLETED and mirror.log.finish_reason == "stop"


async def test_a_mirror_wakes_its_readers() -> None:
    mirror = state_of(CompletionRecord("chatcmpl-2", "chat", "m", 1))
    waiting = asyncio.create_task(mirror.wait(0))
    await asyncio.sleep(0)
    extend(mirror, LogBatch(0, ["a"]))
    await asyncio.wait_for(waiting, 1)
    done = asyncio.create_task(mirror.wait_done())
    await asyncio.sleep(0)
    finish(mirror, CompletionRecord("chatcmpl-2", "chat", "m", 1, status="cancelled", pieces=["a"]))
    await asyncio.wait_for(done, 1)
    assert mirror.status is Status.CANCELLED
