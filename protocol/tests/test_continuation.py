"""Continuation metadata: the delivered pieces on a re-sent request, read back by the node that continues."""

from __future__ import annotations

import json
from typing import Any

import pytest

from openai_stream_protocol import (
    CONTINUE_FROM_KEY,
    CONTINUED_PIECES_KEY,
    BatchSender,
    ChunkSender,
    Continuation,
    Piece,
    ToolCall,
    ToolCallDelta,
    continue_from,
    parse_batch,
    read_continuation,
)
from openai_stream_protocol.testing import RecordingNode

DELIVERED = [
    ("Let me ", None),
    ("check. ", None),
    ('{"city": ', ToolCallDelta(0, "call_1", "weather")),
    ('"Paris"', ToolCallDelta(0)),
    ("", None),
    ('{"q"', ToolCallDelta(1, "call_2", "search")),
]


def test_the_metadata_round_trips_text_and_tool_call_pieces_with_their_count() -> None:
    metadata = {"request_id": "r~1", "seed": 7, **Continuation.of(DELIVERED).to_metadata()}
    assert metadata[CONTINUE_FROM_KEY] == 6
    assert isinstance(metadata[CONTINUED_PIECES_KEY], str)  # dora metadata holds no nested objects
    continuation = read_continuation(metadata)
    assert continuation is not None
    assert continuation.pieces == tuple(Piece(text, delta) for text, delta in DELIVERED)
    assert continuation.count == 6
    assert continuation.text == "Let me check. "
    assert continuation.texts == ["Let me ", "check. ", ""]
    assert continuation.calls() == [ToolCall("call_1", "weather", '{"city": "Paris"'), ToolCall("call_2", "search", '{"q"')]


def test_text_pieces_travel_as_plain_strings_and_tool_pieces_with_the_chunk_keys() -> None:
    raw = json.loads(Continuation.of(DELIVERED[1:4]).to_metadata()[CONTINUED_PIECES_KEY])
    assert raw == [
        "check. ",
        {"text": '{"city": ', "tool_call_index": 0, "tool_call_id": "call_1", "tool_call_name": "weather"},
        {"text": '"Paris"', "tool_call_index": 0},
    ]


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"request_id": "r"}, id="no-key"),
        pytest.param({CONTINUE_FROM_KEY: 0, CONTINUED_PIECES_KEY: "[]"}, id="zero"),
        pytest.param({CONTINUE_FROM_KEY: "0"}, id="zero-as-string"),
    ],
)
def test_a_fresh_request_is_no_continuation(metadata: dict[str, Any]) -> None:
    assert read_continuation(metadata) is None
    assert continue_from(metadata) == 0


@pytest.mark.parametrize(
    "metadata, message",
    [
        pytest.param({CONTINUE_FROM_KEY: 2, CONTINUED_PIECES_KEY: '["a"]'}, "holds 1 pieces", id="count-disagrees"),
        pytest.param({CONTINUE_FROM_KEY: 1}, "JSON list", id="pieces-missing"),
        pytest.param({CONTINUE_FROM_KEY: 1, CONTINUED_PIECES_KEY: "not json"}, "JSON list", id="bad-json"),
        pytest.param({CONTINUE_FROM_KEY: 1, CONTINUED_PIECES_KEY: "[3]"}, "neither a text", id="bad-piece"),
        pytest.param(
            {CONTINUE_FROM_KEY: 1, CONTINUED_PIECES_KEY: '[{"text": "x", "tool_call_index": -1}]'},
            "neither a text",
            id="negative-index",
        ),
        pytest.param({CONTINUE_FROM_KEY: -1, CONTINUED_PIECES_KEY: "[]"}, "must be a count", id="negative-count"),
    ],
)
def test_a_malformed_continuation_raises_rather_than_reading_as_fresh(metadata: dict[str, Any], message: str) -> None:
    # Answering from the start would repeat what the client already has: the node must fail it instead.
    with pytest.raises(ValueError, match=message):
        read_continuation(metadata)


def test_both_senders_number_a_continued_answer_on_from_the_delivered_pieces() -> None:
    metadata = {"request_id": "r~1", **Continuation.of(["a", "b", "c"]).to_metadata()}
    node = RecordingNode()
    single = ChunkSender(node, metadata)
    single.send("d")
    single.finish("stop")
    assert [c.seq for c in node.chunks("r~1")] == [3, 4]

    batch_node = RecordingNode()
    batch = BatchSender(batch_node)
    request_id = batch.open(metadata)
    batch.send(request_id, "d")
    batch.finish(request_id)
    batch.emit()
    assert [c.seq for c in parse_batch(batch_node.sent[0].data)] == [3, 4]
    # A fresh request still starts at 0.
    fresh = ChunkSender(RecordingNode(), {"request_id": "s"})
    assert fresh.seq == 0


def test_continue_from_is_lenient_for_the_senders() -> None:
    assert continue_from({CONTINUE_FROM_KEY: "4"}) == 4
    assert continue_from({CONTINUE_FROM_KEY: "None"}) == 0  # dora's spelling of a None value
    assert continue_from({CONTINUE_FROM_KEY: -2}) == 0


def test_reasoning_pieces_keep_their_kind_and_count_as_text_the_answer_goes_on_from() -> None:
    continuation = Continuation((Piece("hmm, ", reasoning=True), Piece("so "), Piece("x", ToolCallDelta(0, "c", "f"))))
    raw = json.loads(continuation.to_metadata()[CONTINUED_PIECES_KEY])
    assert raw[0] == {"text": "hmm, ", "kind": "reasoning"} and raw[1] == "so "
    back = read_continuation(continuation.to_metadata())
    assert back == continuation and back.text == "hmm, so "
