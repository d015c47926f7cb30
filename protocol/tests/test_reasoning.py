"""Reasoning on the wire: reasoning pieces in both chunk forms, their token count, and the request's reasoning entry."""

from __future__ import annotations

import pyarrow as pa
import pytest

from openai_stream_protocol import (
    KIND_KEY,
    REASONING_KEY,
    BatchSender,
    ChunkSender,
    ReasoningRequest,
    parse_batch,
    parse_chunk,
    request_reasoning,
)
from openai_stream_protocol.testing import RecordingNode


def test_reasoning_pieces_are_numbered_with_the_answer_in_both_forms() -> None:
    node = RecordingNode()
    sender = ChunkSender(node, {"request_id": "a"})
    sender.send_reasoning("think")
    sender.send("answer")
    sender.finish(completion_tokens=2, reasoning_tokens=1)
    batch = BatchSender(node)
    b = batch.open({"request_id": "b"})
    batch.send_reasoning(b, "hmm")
    batch.send(batch.open({"request_id": "c"}), "plain")
    batch.emit()
    batch.send(b, "so")
    batch.finish(b, reasoning_tokens=1)
    batch.emit()
    a = node.chunks("a")
    assert [(c.seq, c.text, c.reasoning) for c in a] == [(0, "think", True), (1, "answer", False), (2, "", False)]
    assert a[-1].reasoning_tokens == 1 and a[0].reasoning_tokens is None
    assert node.metadata()[0][KIND_KEY] == "reasoning" and KIND_KEY not in node.metadata()[1]
    rows = node.chunks("b")
    assert [(c.seq, c.text, c.reasoning) for c in rows] == [(0, "hmm", True), (1, "so", False), (2, "", False)]
    assert rows[-1].reasoning_tokens == 1
    assert node.chunks("c")[0].reasoning is False


def test_a_batch_without_reasoning_has_no_kind_column() -> None:
    node = RecordingNode()
    batch = BatchSender(node)
    batch.send(batch.open({"request_id": "r"}), "x")
    batch.emit()
    assert node.messages()[0].data.type.get_field_index(KIND_KEY) == -1


def test_discard_keeps_the_kinds_of_the_rows_left() -> None:
    node = RecordingNode()
    batch = BatchSender(node)
    gone, kept = batch.open({"request_id": "gone"}), batch.open({"request_id": "kept"})
    batch.send(gone, "a")
    batch.send_reasoning(kept, "r")
    batch.send(kept, "t")
    batch.discard(gone)
    batch.emit()
    assert [(c.text, c.reasoning) for c in node.chunks()] == [("r", True), ("t", False)]


@pytest.mark.parametrize("kind, reasoning", [("reasoning", True), ("text", False), ("", False), ("None", False), (None, False)])
def test_the_kind_is_read_leniently(kind: str | None, reasoning: bool) -> None:
    metadata = {"request_id": "r", "seq": 0} | ({} if kind is None else {KIND_KEY: kind})
    assert parse_chunk(["x"], metadata).reasoning is reasoning


def test_an_unknown_kind_makes_the_chunk_or_the_batch_malformed() -> None:
    with pytest.raises(ValueError, match="kind"):
        parse_chunk(["x"], {"request_id": "r", "seq": 0, KIND_KEY: "image"})
    batch = pa.StructArray.from_arrays(
        [
            pa.array(["r"], type=pa.string()),
            pa.array([0], type=pa.int64()),
            pa.array(["x"], type=pa.string()),
            pa.array([False], type=pa.bool_()),
            pa.array(["audio"], type=pa.string()),
        ],
        names=["request_id", "seq", "text", "fin", KIND_KEY],
    )
    with pytest.raises(ValueError, match="kind"):
        parse_batch(batch)


def test_reasoning_tokens_count_on_finish_chunks_only() -> None:
    assert parse_chunk(["x"], {"request_id": "r", "seq": 0, "reasoning_tokens": 3}).reasoning_tokens is None
    assert parse_chunk([""], {"request_id": "r", "seq": 0, "fin": True, "reasoning_tokens": "3"}).reasoning_tokens == 3


@pytest.mark.parametrize(
    "wish, metadata",
    [
        (ReasoningRequest("high"), '{"effort":"high"}'),
        (ReasoningRequest(budget_tokens=2048), '{"budget_tokens":2048}'),
        (ReasoningRequest(), "{}"),
    ],
)
def test_the_request_entry_round_trips(wish: ReasoningRequest, metadata: str) -> None:
    assert wish.to_metadata() == {REASONING_KEY: metadata}
    assert request_reasoning(wish.to_metadata()) == wish


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({}, None),
        ({REASONING_KEY: "not json"}, None),
        ({REASONING_KEY: "[1]"}, None),
        ({REASONING_KEY: 3}, None),
        ({REASONING_KEY: '{"effort": 5, "budget_tokens": true}'}, ReasoningRequest()),
        ({REASONING_KEY: '{"budget_tokens": -1}'}, ReasoningRequest()),
    ],
)
def test_the_reader_never_raises(metadata: dict[str, object], expected: ReasoningRequest | None) -> None:
    assert request_reasoning(metadata) == expected


def test_effort_none_turns_reasoning_off() -> None:
    assert not ReasoningRequest("none").enabled
    assert ReasoningRequest("low").enabled and ReasoningRequest(budget_tokens=1024).enabled and ReasoningRequest().enabled
