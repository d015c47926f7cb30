"""The batch form: ``BatchSender`` -> one struct-array message -> ``parse_batch`` (docs/architecture.md, "Batch form")."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import BatchSender, Chunk, is_batch, parse_batch, parse_chunk
from openai_stream_protocol.testing import RecordingNode


def rows(chunks: list[Chunk]) -> list[tuple[Any, ...]]:
    return [(c.request_id, c.seq, c.text, c.fin, c.finish_reason) for c in chunks]


def test_one_emit_is_one_message_and_round_trips_through_parse_batch() -> None:
    node = RecordingNode()
    sender = BatchSender(node, output="out")
    a = sender.open({"request_id": "a"})
    b = sender.open({"session_id": "b"})  # dora's streaming key alone is enough
    assert (a, b) == ("a", "b") and "a" in sender and "b" in sender
    sender.send(a, "Hel")
    sender.send(b, "one")
    sender.send(a, "lo")
    assert sender.emit() == 3
    assert len(node.sent) == 1
    output, data, metadata = node.sent[0]
    assert output == "out" and is_batch(data) and "flush" not in metadata
    assert rows(parse_batch(data)) == [("a", 0, "Hel", False, None), ("b", 0, "one", False, None), ("a", 1, "lo", False, None)]
    # seq goes on per request across emits; the finish row carries its reason and counts, then the request is gone.
    sender.send(b, " two")
    sender.finish(a, "length", "!", prompt_tokens=3, completion_tokens=4)
    sender.finish(b, error="boom", finish_reason="error")
    assert sender.emit() == 3 and len(node.sent) == 2
    second = parse_batch(node.sent[1][1])
    assert rows(second) == [("b", 1, " two", False, None), ("a", 2, "!", True, "length"), ("b", 2, "", True, "error")]
    assert (second[1].prompt_tokens, second[1].completion_tokens, second[1].error) == (3, 4, None)
    assert (second[2].prompt_tokens, second[2].completion_tokens, second[2].error) == (None, None, "boom")
    assert second[0].prompt_tokens is None and second[0].sent_at is None  # nulls in the optional columns
    assert "a" not in sender and "b" not in sender


def test_emit_with_nothing_queued_sends_nothing() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    assert sender.emit() == 0 and node.sent == []
    sender.open({"request_id": "r"})
    assert sender.emit() == 0 and node.sent == []


def test_a_step_without_a_finish_carries_the_four_required_columns_only() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    sender.send(sender.open({"request_id": "r"}), "x")
    sender.emit()
    data = node.sent[0][1]
    assert [data.type.field(i).name for i in range(data.type.num_fields)] == ["request_id", "seq", "text", "fin"]
    assert data.type.field("seq").type == pa.int64()


def test_stamp_puts_sent_at_on_every_row() -> None:
    node = RecordingNode()
    sender = BatchSender(node, stamp=True)
    for rid in ("a", "b"):
        sender.send(sender.open({"request_id": rid}), rid)
    sender.emit()
    stamps = [c.sent_at for c in parse_batch(node.sent[0][1])]
    assert len(stamps) == 2 and all(isinstance(s, float) and s > 0 for s in stamps)


def test_discard_forgets_a_request_and_its_queued_rows() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    a, b = sender.open({"request_id": "a"}), sender.open({"request_id": "b"})
    sender.send(a, "a0")
    sender.send(b, "b0")
    sender.finish(a, "stop", "a1")  # a finish row queued before the cancel arrives
    sender.discard(a)
    sender.discard("never-opened")  # harmless
    assert "a" not in sender and sender.queued == 1
    sender.emit()
    assert rows(parse_batch(node.sent[0][1])) == [("b", 0, "b0", False, None)]
    with pytest.raises(KeyError):
        sender.send(a, "after the cancel")


def test_a_finish_with_a_stop_sequence_round_trips_in_its_own_column() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    a, b, c = (sender.open({"request_id": rid}) for rid in "abc")
    sender.send(c, "c0")
    sender.finish(a, "stop", "one two ", stop_sequence="STOP")
    sender.finish(b, "length", "x")
    sender.emit()
    data = node.sent[0][1]
    assert data.type.field("stop_sequence").type == pa.string()
    got = parse_batch(data)
    assert [(c.request_id, c.fin, c.finish_reason, c.stop_sequence) for c in got] == [
        ("c", False, None, None),
        ("a", True, "stop", "STOP"),
        ("b", True, "length", None),
    ]
    # The next step's finishes carry no stop_sequence: the column is not sent then.
    sender.finish(c, "stop")
    sender.emit()
    names = {node.sent[1][1].type.field(i).name for i in range(node.sent[1][1].type.num_fields)}
    assert "finish_reason" in names and "stop_sequence" not in names
    assert parse_batch(node.sent[1][1])[0].stop_sequence is None


def test_discard_drops_a_queued_stop_sequence_and_keeps_the_others() -> None:
    node = RecordingNode()
    sender = BatchSender(node)
    a, b = sender.open({"request_id": "a"}), sender.open({"request_id": "b"})
    sender.finish(a, "stop", stop_sequence="A")
    sender.finish(b, "stop", stop_sequence="B")
    sender.discard(a)
    sender.emit()
    assert [(c.request_id, c.stop_sequence) for c in parse_batch(node.sent[0][1])] == [("b", "B")]


def test_a_hand_built_stop_sequence_column_is_read_on_fin_rows_only() -> None:
    data = batch(
        request_id=pa.array(["a", "b", "c", "d"], type=pa.string()),
        seq=pa.array([0, 0, 0, 0], type=pa.int64()),
        text=pa.array(["", "", "", ""], type=pa.string()),
        fin=pa.array([True, False, True, True], type=pa.bool_()),
        stop_sequence=pa.array(["X", "Y", "", None], type=pa.large_string()),
    )
    assert [c.stop_sequence for c in parse_batch(data)] == ["X", None, None, None]
    all_null = batch(**GOOD, stop_sequence=pa.array([None], type=pa.string()))
    assert parse_batch(all_null)[0].stop_sequence is None


def test_open_needs_an_id_and_finish_a_known_reason() -> None:
    sender = BatchSender(RecordingNode())
    with pytest.raises(ValueError):
        sender.open({"model": "m"})
    rid = sender.open({"request_id": "r"})
    with pytest.raises(ValueError):
        sender.finish(rid, "bogus")
    assert rid in sender  # still open: nothing queued for it
    assert sender.queued == 0


def batch(**columns: pa.Array) -> pa.StructArray:
    return pa.StructArray.from_arrays(list(columns.values()), names=list(columns))


GOOD: dict[str, pa.Array] = {
    "request_id": pa.array(["r"], type=pa.string()),
    "seq": pa.array([0], type=pa.int64()),
    "text": pa.array(["x"], type=pa.string()),
    "fin": pa.array([False], type=pa.bool_()),
}


def test_a_hand_built_batch_reads_like_the_single_chunk_form() -> None:
    """finish_reason alone ends the stream; fin alone means stop, or error when an error is set (as parse_chunk)."""
    data = batch(
        request_id=pa.array(["a", "b", "c"], type=pa.string()),
        seq=pa.array([4, 5, 6], type=pa.int32()),  # any integer type
        text=pa.array(["", "", ""], type=pa.large_string()),
        fin=pa.array([False, True, True], type=pa.bool_()),
        finish_reason=pa.array(["length", None, None], type=pa.string()),
        error=pa.array([None, None, "bad"], type=pa.string()),
        sent_at=pa.array([1, None, 2.5], type=pa.float64()),
    )
    got = parse_batch(data)
    assert [(c.fin, c.finish_reason, c.error, c.sent_at) for c in got] == [
        (True, "length", None, 1.0),
        (True, "stop", None, None),
        (True, "error", "bad", 2.5),
    ]
    single = parse_chunk(["x"], {"request_id": "c", "seq": 6, "fin": True, "error": "bad"})
    assert (single.fin, single.finish_reason, single.error) == (got[2].fin, got[2].finish_reason, got[2].error)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(batch(**{k: v for k, v in GOOD.items() if k != "seq"}), id="missing-seq"),
        pytest.param(batch(**{k: v for k, v in GOOD.items() if k != "request_id"}), id="missing-request_id"),
        pytest.param(batch(**{**GOOD, "seq": pa.array(["0"], type=pa.string())}), id="seq-as-string"),
        pytest.param(batch(**{**GOOD, "fin": pa.array([0], type=pa.int64())}), id="fin-as-int"),
        pytest.param(batch(**{**GOOD, "text": pa.array([1], type=pa.int64())}), id="text-as-int"),
        pytest.param(batch(**{**GOOD, "seq": pa.array([None], type=pa.int64())}), id="null-seq"),
        pytest.param(batch(**{**GOOD, "request_id": pa.array([None], type=pa.string())}), id="null-request_id"),
        pytest.param(batch(**{**GOOD, "prompt_tokens": pa.array([1.5], type=pa.float64())}), id="float-tokens"),
        pytest.param(batch(**{**GOOD, "finish_reason": pa.array(["bogus"], type=pa.string())}), id="unknown-reason"),
        pytest.param(batch(**{**GOOD, "stop_sequence": pa.array([1], type=pa.int64())}), id="stop_sequence-as-int"),
        pytest.param(pa.StructArray.from_arrays(list(GOOD.values()), names=list(GOOD), mask=pa.array([True])), id="null-row"),
        pytest.param(pa.array([{"x": 1}]), id="struct-of-something-else"),
        pytest.param(pa.array(["not", "a", "batch"], type=pa.string()), id="string-array"),
        pytest.param(pa.array([[1, 2]], type=pa.list_(pa.int64())), id="list-array"),
    ],
)
def test_a_malformed_batch_raises_value_error(data: pa.Array) -> None:
    with pytest.raises(ValueError):
        parse_batch(data)


def test_only_a_struct_array_is_a_batch() -> None:
    assert is_batch(batch(**GOOD))
    assert not is_batch(pa.array(["x"], type=pa.string()))
    assert not is_batch(pa.array([], type=pa.null()))
