"""Resend: the ask's wire form, ``ResendingOutput``'s bounded memory, and what it answers."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import (
    RESEND_MISSED_KEY,
    BatchSender,
    ChunkSender,
    Heartbeat,
    NodeStatus,
    ResendAsk,
    ResendingOutput,
    dispatch_event,
    has_resend_input,
    is_resend_missed,
    parse_resend_missed,
    read_resend_ask,
    send_hello,
    send_resend_ask,
)
from openai_stream_protocol.testing import RecordingNode


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def ask_event(ask: ResendAsk) -> dict[str, Any]:
    node = RecordingNode()
    send_resend_ask(node, "resend/echo-1", ask)
    [sent] = node.sent
    return {"type": "INPUT", "id": "resend", "value": sent.data, "metadata": sent.metadata}


def test_an_ask_round_trips_and_an_open_ask_has_no_end() -> None:
    node = RecordingNode()
    send_resend_ask(node, "resend/echo-1", ResendAsk("r1", 41, 47))
    send_resend_ask(node, "resend/echo-1", ResendAsk("r2", 9))
    closed, open_ended = node.sent
    assert closed.output_id == "resend/echo-1" and closed.data.to_pylist() == ["r1"]
    assert closed.metadata == {"request_id": "r1", "resend_from": 41, "resend_to": 47}
    assert open_ended.metadata == {"request_id": "r2", "resend_from": 9}
    assert read_resend_ask(closed.data, closed.metadata) == ResendAsk("r1", 41, 47)
    assert read_resend_ask(open_ended.data, open_ended.metadata) == ResendAsk("r2", 9, None)


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param({"request_id": "r"}, id="no-range"),
        pytest.param({"request_id": "r", "resend_from": -1}, id="negative"),
        pytest.param({"request_id": "r", "resend_from": 5, "resend_to": 5}, id="empty-range"),
        pytest.param({"request_id": "r", "resend_from": "x"}, id="not-a-number"),
        pytest.param({"resend_from": 1}, id="no-id"),
    ],
)
def test_a_bad_ask_reads_as_none_and_never_raises(metadata: dict[str, Any]) -> None:
    assert read_resend_ask(pa.array([], type=pa.string()), metadata) is None


def test_lenient_ask_the_id_from_the_data_and_numbers_as_strings() -> None:
    assert read_resend_ask(pa.array(["r"]), {"resend_from": "3", "resend_to": "5"}) == ResendAsk("r", 3, 5)


def test_dispatch_hands_an_ask_to_on_resend_and_a_handler_without_it_ignores_it() -> None:
    class Handler:
        def __init__(self) -> None:
            self.asks: list[ResendAsk] = []

        def on_request(self, texts: list[str], metadata: Any) -> None: ...
        def on_cancel(self, request_id: str) -> None: ...
        def on_stop(self) -> None: ...
        def on_resend(self, ask: ResendAsk) -> None:
            self.asks.append(ask)

    class OldHandler:
        def on_request(self, texts: list[str], metadata: Any) -> None: ...
        def on_cancel(self, request_id: str) -> None: ...
        def on_stop(self) -> None: ...

    handler = Handler()
    assert dispatch_event(ask_event(ResendAsk("r", 2, 4)), handler)
    assert handler.asks == [ResendAsk("r", 2, 4)]
    assert dispatch_event(ask_event(ResendAsk("r", 2, 4)), OldHandler())  # ignored, as any unknown input


def test_hello_and_heartbeat_say_can_resend_and_an_old_hello_reads_as_cannot() -> None:
    node = RecordingNode()
    Heartbeat(node, "echo-1", can_continue=True, can_resend=True).hello()
    send_hello(node, "old")
    new, old = node.statuses()
    assert new.can_resend and new.can_continue and not old.can_resend
    assert node.sent[0].metadata["can_resend"] is True
    heartbeat = Heartbeat(node, "echo-1", can_resend=True, clock=Clock())
    heartbeat.beat(1)
    assert node.statuses()[-1] == NodeStatus("heartbeat", "echo-1", False, None, 1, 0, can_resend=True)


def chunk_node(**kwargs: Any) -> tuple[RecordingNode, ResendingOutput, Clock]:
    clock = Clock()
    inner = RecordingNode()
    return inner, ResendingOutput(inner, clock=clock, **kwargs), clock


def test_single_chunks_are_sent_again_as_first_sent_marked_resent() -> None:
    inner, out, _ = chunk_node()
    sender = ChunkSender(out, {"request_id": "r"})
    for word in ("a ", "b ", "c ", "d "):
        sender.send(word)
    sender.finish("stop", "e", completion_tokens=5)
    inner.clear()
    assert out.resend(ResendAsk("r", 1, 3)) == 2
    assert [(c.seq, c.text) for c in inner.chunks()] == [(1, "b "), (2, "c ")]
    assert all(m["resent"] is True for m in inner.metadata())
    inner.clear()
    assert out.resend(ResendAsk("r", 3)) == 2  # open-ended: the rest, the finish marker included
    last = inner.chunks()[-1]
    assert (last.seq, last.text, last.fin, last.completion_tokens) == (4, "e", True, 5)
    assert out.resent == 4 and out.missed == 0


def test_a_slow_node_answers_an_open_ask_with_nothing() -> None:
    inner, out, _ = chunk_node()
    sender = ChunkSender(out, {"request_id": "r"})
    sender.send("a")
    inner.clear()
    assert out.resend(ResendAsk("r", 1)) == 0
    assert inner.sent == []  # nothing sent past seq 0 yet: not lost, just not there


def test_what_is_no_longer_held_is_answered_missed() -> None:
    inner, out, _ = chunk_node(max_chunks=2)
    sender = ChunkSender(out, {"request_id": "r"})
    for word in "abcd":
        sender.send(word)
    inner.clear()
    assert out.resend(ResendAsk("r", 0, 2)) == 0
    [missed] = inner.sent
    assert missed.output_id == "chunks" and is_resend_missed(missed.metadata) and not missed.data.to_pylist()
    assert parse_resend_missed(missed.metadata) == ("r", 0)
    assert inner.chunks() == [] or all(c.seq is None for c in inner.chunks())  # never a numbered chunk
    inner.clear()
    out.resend(ResendAsk("unknown", 3))
    assert parse_resend_missed(inner.sent[0].metadata) == ("unknown", 3)
    assert out.missed == 2


def test_batch_rows_are_sent_again_from_their_steps_only_that_requests() -> None:
    inner, out, _ = chunk_node()
    batch = BatchSender(out)
    for rid in ("r1", "r2"):
        batch.open({"request_id": rid})
    for step in range(3):
        batch.send("r1", f"x{step} ")
        batch.send("r2", f"y{step} ")
        batch.emit()
    batch.finish("r1", "stop", "end", completion_tokens=4)
    batch.emit()
    inner.clear()
    assert out.resend(ResendAsk("r1", 1)) == 3
    assert len(inner.sent) == 3  # one message per step the rows came in
    assert all(m == {"resent": True} for m in inner.metadata())
    rows = inner.chunks()
    assert [(c.request_id, c.seq, c.text, c.fin) for c in rows] == [
        ("r1", 1, "x1 ", False),
        ("r1", 2, "x2 ", False),
        ("r1", 3, "end", True),
    ]
    assert rows[-1].completion_tokens == 4 and rows[-1].finish_reason == "stop"


def test_memory_is_bounded_per_request_and_in_bytes_finished_requests_first() -> None:
    inner, out, clock = chunk_node(max_chunks=3, max_bytes=3_000, linger_s=10)
    done = ChunkSender(out, {"request_id": "done"})
    done.finish("stop", "x" * 100)
    sender = ChunkSender(out, {"request_id": "live"})
    for _ in range(10):
        sender.send("y" * 1000)
    assert out.nbytes <= 3_000
    assert out.requests == 1  # the finished one went first
    held = out._kept["live"]
    assert 1 <= len(held.entries) <= 3 and [e[0] for e in held.entries][-1] == 9
    clock.now += 5
    sender.finish("stop")
    clock.now += 11
    out.resend(ResendAsk("other", 0))  # any call past the linger lets the finished requests go
    assert out.requests == 0 and out.nbytes == 0


def test_cancel_forgets_and_status_messages_and_legacy_replies_are_never_kept() -> None:
    inner, out, _ = chunk_node()
    Heartbeat(out, "n").hello()
    out.send_output("chunks", pa.array(["whole answer"]), {"request_id": "legacy"})
    sender = ChunkSender(out, {"request_id": "r"})
    sender.send("a")
    assert out.requests == 1
    out.forget("r")
    assert out.requests == 0 and out.nbytes == 0
    assert len(inner.sent) == 3  # everything went on to the node unchanged


def test_the_node_config_says_whether_there_is_a_resend_input() -> None:
    class Node:
        def __init__(self, config: Any) -> None:
            self.config = config

        def node_config(self) -> Any:
            if isinstance(self.config, Exception):
                raise self.config
            return self.config

    assert has_resend_input(Node({"inputs": {"v1/chat/completions": {}, "resend": {"source": "s/resend/n"}}}))
    assert not has_resend_input(Node({"inputs": {"v1/chat/completions": {}}}))
    assert not has_resend_input(Node(RuntimeError("old dora")))
    assert not has_resend_input(RecordingNode())


def test_a_missed_answer_is_not_a_status_and_reads_back() -> None:
    metadata = {RESEND_MISSED_KEY: "r", "resend_from": "4"}
    assert is_resend_missed(metadata) and parse_resend_missed(metadata) == ("r", 4)
    assert parse_resend_missed({RESEND_MISSED_KEY: "r"}) is None


def test_batch_rows_are_bounded_per_request_and_in_bytes_over_all_requests() -> None:
    inner, out, _ = chunk_node(max_chunks=4, max_bytes=4_000)
    batch = BatchSender(out)
    ids = [f"r{i}" for i in range(5)]
    for rid in ids:
        batch.open({"request_id": rid})
    for step in range(10):
        for rid in ids:
            batch.send(rid, f"{rid}-{step} ")
        batch.emit()
    assert out.nbytes <= 4_000
    assert sum(k.nbytes for k in out._kept.values()) == out.nbytes  # the account matches what is kept
    for rid in ids:
        seqs = [e[0] for e in out._kept[rid].entries]
        assert 1 <= len(seqs) <= 4 and seqs == list(range(10 - len(seqs), 10))  # the newest, in order


def test_with_several_servers_an_ask_on_resend_slash_server_is_that_servers_and_so_is_the_missed_answer() -> None:
    class Handler:
        def __init__(self) -> None:
            self.asks: list[ResendAsk] = []

        def on_request(self, texts: list[str], metadata: Any) -> None: ...
        def on_cancel(self, request_id: str) -> None: ...
        def on_stop(self) -> None: ...
        def on_resend(self, ask: ResendAsk) -> None:
            self.asks.append(ask)

    event = ask_event(ResendAsk("r", 0))
    handler = Handler()
    dispatch_event({**event, "id": "resend/openai-stream-server-2"}, handler)
    assert handler.asks == [ResendAsk("r", 0, None, "openai-stream-server-2")]
    inner, out, _ = chunk_node()
    out.resend(handler.asks[0])  # unknown here: the missed answer goes to the asking server's chunk output
    assert inner.sent[0].output_id == "chunks/openai-stream-server-2"

    class Node:
        def node_config(self) -> Any:
            return {"inputs": {"resend/openai-stream-server-1": {}}}

    assert has_resend_input(Node())
