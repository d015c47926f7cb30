"""The reorder buffer: order, duplicates, gaps, finish marker, limits."""

from __future__ import annotations

import random

import pytest

from openai_stream_protocol import Chunk
from openai_stream_server.state import Limits, Outcome, Status, StreamState


def chunks(words: list[str], rid: str = "r") -> list[Chunk]:
    out = [Chunk(rid, i, w) for i, w in enumerate(words)]
    out.append(Chunk(rid, len(words), "", fin=True, finish_reason="stop"))
    return out


WORDS = [f"w{i} " for i in range(40)]


@pytest.mark.parametrize("seed", range(10))
async def test_any_order_with_duplicates_reassembles(seed: int) -> None:
    rng = random.Random(seed)
    incoming = chunks(WORDS)
    incoming += rng.sample(incoming, 10)  # duplicates
    rng.shuffle(incoming)
    state = StreamState("r", "m", "chat")
    outcomes = [state.accept(c, 0.0) for c in incoming]
    assert state.status is Status.COMPLETED
    assert state.log.text == "".join(WORDS)
    assert state.log.finish_reason == "stop"
    assert outcomes.count(Outcome.DUPLICATE) + outcomes.count(Outcome.LATE) == 10


async def test_gap_times_out_naming_the_missing_seq() -> None:
    state = StreamState("r", "m", "chat")
    incoming = chunks(WORDS)
    del incoming[7]
    for c in incoming:
        state.accept(c, 10.0)
    assert state.log.text == "".join(WORDS[:7]) and not state.done
    assert not state.check_deadlines(14.0, 60, 30, gap_timeout_s=5)
    assert state.check_deadlines(15.5, 60, 30, gap_timeout_s=5)
    assert state.status is Status.FAILED
    assert state.error is not None and "seq 7" in state.error.message and state.error.code == "missing_chunk"


async def test_first_chunk_and_idle_timeouts() -> None:
    state = StreamState("r", "m", "chat")
    start = state.started_at
    assert not state.check_deadlines(start + 1, 2, 1, 1)
    assert state.check_deadlines(start + 3, 2, 1, 1)
    assert state.error is not None and state.error.status == 504
    state = StreamState("r", "m", "chat")
    state.accept(Chunk("r", 0, "a"), start + 1)
    assert not state.check_deadlines(start + 1.5, 2, 1, 1)
    assert state.check_deadlines(start + 2.5, 2, 1, 1)


async def test_chunks_after_the_end_are_late() -> None:
    state = StreamState("r", "m", "chat")
    for c in chunks(["a"]):
        state.accept(c, 0)
    assert state.accept(Chunk("r", 5, "x"), 0) is Outcome.LATE
    state = StreamState("r", "m", "chat")
    state.cancel()
    assert state.accept(Chunk("r", 0, "x"), 0) is Outcome.LATE


async def test_chunk_past_the_finish_marker_is_dropped() -> None:
    state = StreamState("r", "m", "chat")
    state.accept(Chunk("r", 2, "", fin=True, finish_reason="length"), 0)
    assert state.accept(Chunk("r", 3, "x"), 0) is Outcome.DUPLICATE
    state.accept(Chunk("r", 1, "b"), 0)
    state.accept(Chunk("r", 0, "a"), 0)
    assert state.log.text == "ab" and state.log.finish_reason == "length"


async def test_buffer_limit_fails_the_request() -> None:
    state = StreamState("r", "m", "chat", limits=Limits(max_buffered_chunks=3))
    outcomes = [state.accept(Chunk("r", seq, "x"), 0) for seq in range(1, 5)]
    assert outcomes[-1] is Outcome.OVERFLOW and state.status is Status.FAILED


async def test_node_error_and_usage_from_the_node() -> None:
    state = StreamState("r", "m", "chat", prompt_tokens=9)
    state.accept(Chunk("r", 0, "partial"), 0)
    state.accept(Chunk("r", 1, "", fin=True, finish_reason="error", error="CUDA out of memory"), 0)
    assert state.status is Status.FAILED and state.error is not None and "CUDA" in state.error.message
    state = StreamState("r", "m", "chat", prompt_tokens=9)
    state.accept(Chunk("r", 0, "a", fin=True, finish_reason="stop", prompt_tokens=4, completion_tokens=7), 0)
    assert state.log.usage == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}


async def test_legacy_reply_is_the_whole_answer() -> None:
    state = StreamState("r", "m", "chat")
    assert state.accept(Chunk(None, None, "all of it", fin=True, finish_reason="stop"), 0) is Outcome.DELIVERED
    assert state.status is Status.COMPLETED and state.log.text == "all of it"
