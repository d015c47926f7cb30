"""A stored completion keeps its reasoning: the record, a state rebuilt from it, and a live-log batch (Redis)."""

from __future__ import annotations

from openai_stream_protocol import Chunk, ToolCallDelta
from openai_stream_server.state import StreamState
from openai_stream_server.store.base import LogBatch
from openai_stream_server.store.record import decode, encode
from openai_stream_server.store.redis_store import _batch_bytes, _batch_of
from openai_stream_server.store.snapshot import record_of, state_of


def thinking_state() -> StreamState:
    state = StreamState("chatcmpl-7", "m", "chat")
    chunks = [
        Chunk("chatcmpl-7", 0, "ponder ", reasoning=True),
        Chunk("chatcmpl-7", 1, "more", reasoning=True),
        Chunk("chatcmpl-7", 2, "answer"),
        Chunk("chatcmpl-7", 3, "{}", tool_call=ToolCallDelta(0, "call_x", "f")),
        Chunk("chatcmpl-7", 4, "", fin=True, finish_reason="tool_calls", completion_tokens=6, reasoning_tokens=3),
    ]
    for chunk in chunks:
        state.accept(chunk, 0.0)
    return state


def test_a_record_round_trip_keeps_the_reasoning_and_its_count() -> None:
    record = record_of(thinking_state())
    assert (record.reasoning, record.reasoning_tokens) == ([0, 1], 3)
    back = decode(encode(record))
    assert back == record
    rebuilt = state_of(back)
    assert (rebuilt.log.reasoning_text, rebuilt.log.text, rebuilt.log.reasoning_used) == ("ponder more", "answer", 3)
    assert rebuilt.log.segments(0, len(rebuilt.log)) == thinking_state().log.segments(0, 5)


def test_a_record_without_reasoning_encodes_as_before() -> None:
    state = StreamState("chatcmpl-8", "m", "chat")
    state.accept(Chunk("chatcmpl-8", 0, "hi", fin=True, finish_reason="stop"), 0.0)
    assert b'"rs"' not in encode(record_of(state)) and b'"rt"' not in encode(record_of(state))


def test_a_live_log_batch_keeps_its_reasoning_pieces() -> None:
    batch = LogBatch(4, ["a", "b"], {5: ToolCallDelta(0, "c", "f")}, {4})
    assert _batch_of(_batch_bytes(batch)) == batch
    plain = LogBatch(0, ["x"])
    assert _batch_of(_batch_bytes(plain)) == plain and _batch_bytes(plain).count(b",") == 2  # three elements, as before
