"""The completion record and its compact encoding (openai_stream_server/store/record.py)."""

from __future__ import annotations

import orjson
import pytest

from openai_stream_protocol import Part, ToolCallDelta
from openai_stream_server.store.record import (
    FORMAT_VERSION,
    RESTARTED_CODE,
    RESTARTED_MESSAGE,
    CompletionRecord,
    RecordError,
    RecordFormatError,
    decode,
    encode,
    expired,
)


def full_record() -> CompletionRecord:
    return CompletionRecord(
        id="resp_abc",
        surface="responses",
        model="dora-stream",
        created=1_700_000_000,
        status="failed",
        finish_reason="error",
        stop_sequence="\n\n",
        error=RecordError("node said no", "server_error", "upstream_error", "model"),
        prompt_tokens=12,
        completion_tokens=3,
        pieces=["Hel", "lo ", "{\"a\":", " 1}", "é✓"],
        tool_calls={2: ToolCallDelta(0, "call_1", "lookup"), 3: ToolCallDelta(0)},
        parts=[
            Part("system", "text", "be brief"),
            Part("user", "image", "data:image/png;base64,AAAA"),
            Part("assistant", "tool_calls", "[]"),
            Part("tool", "text", "42", tool_call_id="call_0"),
        ],
        context={"instructions": "be brief", "metadata": {"k": "v"}, "tools": [{"type": "function", "name": "f"}]},
        stored=True,
        expires_at=1_700_086_400.5,
        instance="0123456789abcdef",
    )


def test_every_field_survives_a_round_trip() -> None:
    record = full_record()
    assert decode(encode(record)) == record


def test_an_opened_record_is_small_and_leaves_defaults_out() -> None:
    record = CompletionRecord("chatcmpl-1", "chat", "m", 1)
    data = encode(record)
    assert orjson.loads(data) == {"v": FORMAT_VERSION, "id": "chatcmpl-1", "s": "chat", "m": "m", "c": 1, "st": "in_progress"}
    assert decode(data) == record


def test_a_record_costs_little_more_than_its_text() -> None:
    pieces = [f"word{i} " for i in range(200)]
    record = CompletionRecord("chatcmpl-2", "chat", "m", 1, status="completed", finish_reason="stop", pieces=pieces)
    text_bytes = sum(len(p) for p in pieces)
    # one JSON string per piece: the text, two quotes and a comma
    assert len(encode(record)) <= text_bytes + 3 * len(pieces) + 120


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"not json", id="not-json"),
        pytest.param(b"[1, 2]", id="not-an-object"),
        pytest.param(b'{"v": 1, "id": "x"}', id="missing-fields"),
        pytest.param(b'{"v": 1, "id": "x", "s": "chat", "m": "m", "c": 1, "st": "weird"}', id="unknown-status"),
        pytest.param(b'{"v": 99, "id": "x", "s": "chat", "m": "m", "c": 1, "st": "completed"}', id="later-version"),
    ],
)
def test_anything_else_is_refused(data: bytes) -> None:
    with pytest.raises(RecordFormatError):
        decode(data)


def test_settled_turns_only_an_in_flight_record_into_a_restart_failure() -> None:
    opened = CompletionRecord("chatcmpl-3", "chat", "m", 1, pieces=["a"])
    settled = opened.settled()
    assert (settled.status, settled.finish_reason) == ("failed", "error")
    assert settled.error == RecordError(RESTARTED_MESSAGE, "server_error", RESTARTED_CODE)
    assert settled.pieces == ["a"] and opened.status == "in_progress"
    done = CompletionRecord("chatcmpl-4", "chat", "m", 1, status="completed")
    assert done.settled() is done


def test_expired_only_past_a_set_expiry() -> None:
    record = CompletionRecord("x", "chat", "m", 1)
    assert not expired(record, now=10**12)  # 0: not set yet
    record.expires_at = 100.0
    assert not expired(record, now=99.0)
    assert expired(record, now=100.0)
