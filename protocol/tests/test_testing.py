"""The test helpers every test imports: the recording fake node and the bounded waits."""

from __future__ import annotations

import asyncio
import threading

import pyarrow as pa
import pytest

from openai_stream_protocol import BatchSender, ChunkSender, send_hello
from openai_stream_protocol.testing import RecordingNode, Sent, wait_for, wait_until, wait_until_async


def test_the_recording_node_keeps_each_call_and_reads_both_chunk_forms() -> None:
    node = RecordingNode()
    send_hello(node, "model")
    single = ChunkSender(node, {"request_id": "a"})
    single.send("Hel")
    single.send("lo")
    single.finish("stop")
    batch = BatchSender(node)
    b = batch.open({"request_id": "b"})
    batch.send(b, "one")
    batch.finish(b, "length")
    batch.emit()
    node.send_output("cancel", pa.array(["a"]), {"request_id": "a"})

    assert [s.output_id for s in node.sent] == ["chunks"] * 5 + ["cancel"]
    assert isinstance(node.sent[0], Sent) and node.sent[0].is_hello
    output, data, metadata = node.sent[1]  # a plain tuple, too
    assert (output, data.to_pylist(), metadata["seq"]) == ("chunks", ["Hel"], 0)
    assert node.text("a", "chunks") == "Hello" and node.text("b") == "one"
    assert node.text("a") == "Helloa"  # without the output filter the cancel message reads as a chunk of "a"
    finishes = [(c.seq, c.fin, c.finish_reason) for c in node.chunks("a", "chunks")]
    assert finishes == [(0, False, None), (1, False, None), (2, True, "stop")]
    assert [c.request_id for c in node.chunks(output_id="chunks")] == ["a", "a", "a", "b", "b"]
    assert node.texts("chunks") == ["Hel", "lo", ""]  # the batch and the hello are not single chunks
    assert node.metadata("cancel") == [{"request_id": "a"}]
    assert node.values("cancel") == [["a"]]
    assert node.request_ids("cancel") == ["a"]
    node.clear()
    assert node.sent == [] and node.chunks() == []


def test_the_recording_node_replays_its_events_then_answers_none() -> None:
    events = [{"type": "INPUT", "id": "x"}, {"type": "STOP"}]
    node = RecordingNode(events)
    assert node.next() == events[0]
    assert list(node) == events[1:]
    assert node.next(timeout=0.1) is None


def test_the_recording_node_records_from_many_threads() -> None:
    node = RecordingNode()

    def send(n: int) -> None:
        for i in range(200):
            node.send_output("chunks", pa.array([f"{n}:{i}"]), {"request_id": str(n), "seq": i})

    threads = [threading.Thread(target=send, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert len(node.sent) == 800
    assert [c.seq for c in node.chunks("2")] == list(range(200))


def test_wait_for_answers_true_once_the_condition_holds_and_false_on_timeout() -> None:
    calls = iter(range(100))
    assert wait_for(lambda: next(calls) >= 3, 5.0, interval_s=0)
    assert next(calls) == 4  # stopped polling as soon as it held
    assert wait_for(lambda: False, 0.02) is False
    seen: list[int] = []
    assert wait_for(lambda: seen.append(1), 0) is False and seen == [1]  # polled once even with no time


def test_wait_until_returns_the_value_and_raises_naming_what_it_waited_for() -> None:
    values = iter([None, [], ["x"]])
    assert wait_until(lambda: next(values), 5.0, interval_s=0) == ["x"]
    with pytest.raises(AssertionError, match=r"timed out after 0.02 s waiting for the answer \(last value: 0\)"):
        wait_until(lambda: 0, 0.02, what="the answer")


def test_wait_until_async_polls_sync_and_async_predicates_and_lets_the_loop_run() -> None:
    async def scenario() -> None:
        box: list[str] = []
        asyncio.get_running_loop().call_later(0.01, box.append, "done")
        assert await wait_until_async(lambda: box, 5.0) == ["done"]

        async def later() -> str:
            return "async"

        assert await wait_until_async(later) == "async"
        with pytest.raises(AssertionError, match="waiting for nothing"):
            await wait_until_async(lambda: None, 0.01, what="nothing")

    asyncio.run(scenario())
