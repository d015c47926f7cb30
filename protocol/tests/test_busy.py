"""Busy: a node turns a request away with nothing generated, so that the server may try another replica."""

from __future__ import annotations

import pyarrow as pa

from openai_stream_protocol import BUSY, BatchSender, ChunkSender, parse_batch, parse_chunk
from openai_stream_protocol.testing import RecordingNode


def test_a_busy_answer_is_an_error_finish_with_its_code_in_both_forms() -> None:
    node = RecordingNode()
    ChunkSender(node, {"request_id": "a"}).busy("queue full")
    batch = BatchSender(node)
    batch.busy(batch.open({"request_id": "b"}), "no slot")
    other = batch.open({"request_id": "c"})
    batch.finish(other, "error", error="bad image")  # a real error: no code
    batch.send(batch.open({"request_id": "d"}), "x")
    batch.emit()
    [single] = node.chunks("a")
    assert (single.seq, single.fin, single.finish_reason, single.error) == (0, True, "error", "queue full")
    assert single.error_code == BUSY and single.is_busy
    rows = {c.request_id: c for c in node.chunks()}
    assert rows["b"].is_busy and rows["b"].error == "no slot" and rows["b"].finish_reason == "error"
    assert not rows["c"].is_busy and rows["c"].error == "bad image"
    assert rows["d"].error_code is None and not rows["d"].fin


def test_a_code_counts_only_on_an_error_finish() -> None:
    # On a chunk that is not an error finish it means nothing: a node cannot turn away an answer it is streaming.
    assert parse_chunk(["x"], {"request_id": "r", "seq": 0, "error_code": BUSY}).error_code is None
    assert parse_chunk([""], {"request_id": "r", "seq": 0, "fin": True, "error_code": BUSY}).error_code is None
    assert parse_chunk([""], {"request_id": "r", "seq": 0, "fin": True, "error": "e", "error_code": "None"}).error_code is None
    batch = pa.StructArray.from_arrays(
        [
            pa.array(["r", "s"], type=pa.string()),
            pa.array([0, 0], type=pa.int64()),
            pa.array(["", ""], type=pa.string()),
            pa.array([True, False], type=pa.bool_()),
            pa.array([BUSY, BUSY], type=pa.string()),
        ],
        names=["request_id", "seq", "text", "fin", "error_code"],
    )
    assert [c.error_code for c in parse_batch(batch)] == [None, None]  # no error on either row


def test_a_busy_row_dropped_by_discard_takes_its_code_along() -> None:
    node = RecordingNode()
    batch = BatchSender(node)
    batch.busy(batch.open({"request_id": "gone"}))
    batch.finish(batch.open({"request_id": "kept"}), "error", error="real")
    batch.discard("gone")
    batch.emit()
    [row] = node.chunks()
    assert row.request_id == "kept" and row.error_code is None
