"""``DoraBridge`` against a fake ``dora.Node``: scripted events, no dataflow.

The fake implements what the bridge calls (``next``, ``drain``, ``send_output``, ``node_config``);
``next`` blocks on a queue with a bounded wait, as dora's does on its channel. Every wait in these
tests has a deadline.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pyarrow as pa
import pytest

from openai_stream_protocol import Chunk
from openai_stream_protocol.testing import RecordingNode, wait_for, wait_until_async
from openai_stream_server.app import create_app
from openai_stream_server.bridge import MAX_BATCHES_IN_FLIGHT, DoraBridge
from openai_stream_server.errors import ApiError, BackendUnavailable
from openai_stream_server.settings import Settings
from tests.live import metric

pytestmark = pytest.mark.timeout(30)

ANSWERS = "v1/chat/completions"
END = object()  # the fake's channel ends: next() returns None
NEXT_WAIT_S = 5.0  # one next() waits at most this long for an event, then reports the end


class FakeNode(RecordingNode):
    """A stand-in for ``dora.Node`` that records what is sent (``RecordingNode``) and scripts its events.

    After it has returned STOP, ``drain`` raises RuntimeError as dora's does.
    """

    def __init__(self, *, batch: bool = True, inputs: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.batch = batch
        """``drain()`` returns whatever is queued; False: nothing, so each event is its own batch."""
        self.inputs = inputs
        self.drain_raises_once = False
        self.next_calls = 0
        self.calls_after_stop = 0
        self._events: queue.Queue[Any] = queue.Queue()
        self._stopped = False

    def push(self, *events: Any) -> None:
        for event in events:
            self._events.put(event)

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        if self._stopped:
            self.calls_after_stop += 1
        self.next_calls += 1
        try:
            event = self._events.get(timeout=NEXT_WAIT_S)
        except queue.Empty:
            return None
        return self._take(event)

    def drain(self) -> list[dict[str, Any]]:
        if self._stopped:
            self.calls_after_stop += 1
            raise RuntimeError("event stream closed")
        if self.drain_raises_once:
            self.drain_raises_once = False
            raise RuntimeError("event stream closed")
        events: list[dict[str, Any]] = []
        while self.batch:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                break
            if event is END:
                self._events.put(END)
                break
            taken = self._take(event)
            assert taken is not None
            events.append(taken)
            if self._stopped:
                break  # dora's stream ends with STOP
        return events

    def _take(self, event: Any) -> dict[str, Any] | None:
        if event is END:
            return None
        if event["type"] == "STOP":
            self._stopped = True
        return event  # type: ignore[no-any-return]

    def node_config(self) -> dict[str, Any]:
        if self.inputs is None:
            raise AttributeError("node_config")
        return {"inputs": self.inputs}


def chunk_event(request_id: str, seq: Any, text: str, input_id: str = ANSWERS, **metadata: Any) -> dict[str, Any]:
    return {
        "type": "INPUT",
        "id": input_id,
        "value": pa.array([text], type=pa.string()),
        "metadata": {"request_id": request_id, "seq": seq, **metadata},
    }


STOP = {"type": "STOP"}


class Recorder:
    """The three callbacks the bridge is started with, recording what they got (on the loop thread)."""

    def __init__(self) -> None:
        self.batches: list[list[Chunk]] = []
        self.stops = 0
        self.lost: list[ApiError] = []

    def sink(self, batch: list[Chunk]) -> None:
        self.batches.append(batch)

    def on_stop(self) -> None:
        self.stops += 1

    def on_lost(self, error: ApiError) -> None:
        self.lost.append(error)

    @property
    def chunks(self) -> list[Chunk]:
        return [c for b in self.batches for c in b]


def reader_of(bridge: DoraBridge) -> threading.Thread:
    thread = bridge._thread
    assert thread is not None
    return thread


async def started(node: FakeNode) -> tuple[DoraBridge, Recorder]:
    bridge, rec = DoraBridge(node), Recorder()
    await bridge.start(rec.sink, rec.on_stop, rec.on_lost)
    return bridge, rec


async def ended(bridge: DoraBridge, node: FakeNode) -> None:
    """Let the reader finish (STOP) before the test's loop closes."""
    if reader_of(bridge).is_alive():
        node.push(STOP)
    reader = reader_of(bridge)
    await wait_until_async(lambda: not reader.is_alive())


# -- events that are not chunks ------------------------------------------------------


async def test_tick_inputs_are_neither_delivered_nor_counted_as_malformed() -> None:
    node = FakeNode()
    node.push(
        {"type": "INPUT", "id": "tick", "value": pa.array([], type=pa.null()), "metadata": {}},
        {"type": "INPUT", "id": "dora/timer/millis/500", "value": pa.array([1]), "metadata": {}},
        chunk_event("r1", 0, "hello"),
        STOP,
    )
    bridge, rec = await started(node)
    await wait_until_async(lambda: rec.stops == 1)
    await ended(bridge, node)
    assert [(c.request_id, c.seq, c.text) for c in rec.chunks] == [("r1", 0, "hello")]
    assert bridge.malformed_chunks == 0


async def test_stop_ends_the_reader_once_even_when_drain_raises_around_it() -> None:
    """dora's ``drain()`` raises RuntimeError once its channel has closed: the reader must not fail on it."""
    node = FakeNode()
    node.drain_raises_once = True
    node.push(chunk_event("r1", 0, "a"))  # next() returns it, then drain() raises
    bridge, rec = await started(node)
    await wait_until_async(lambda: len(rec.chunks) == 1)
    node.push(chunk_event("r1", 1, "b"), STOP, chunk_event("r1", 2, "never read"))
    reader = reader_of(bridge)
    await wait_until_async(lambda: not reader.is_alive())
    await asyncio.sleep(0)  # on_stop is handed over with call_soon_threadsafe
    await wait_until_async(lambda: rec.stops == 1)
    assert [c.text for c in rec.chunks] == ["a", "b"]
    assert rec.stops == 1 and node.calls_after_stop == 0 and rec.lost == []
    assert bridge.stopped and not bridge.health()["connected"]


async def test_stop_from_next_is_not_followed_by_drain() -> None:
    node = FakeNode()
    bridge, rec = await started(node)
    node.push(STOP)
    await wait_until_async(lambda: rec.stops == 1)
    reader = reader_of(bridge)
    await wait_until_async(lambda: not reader.is_alive())
    assert node.calls_after_stop == 0 and rec.stops == 1


async def test_a_malformed_chunk_is_counted_and_exported_in_metrics() -> None:
    node = FakeNode()
    bridge = DoraBridge(node)
    app = create_app(Settings(sweep_interval_s=0.02), bridge)
    async with app.router.lifespan_context(app):
        node.push(
            chunk_event("r1", "not-a-number", "x"),
            chunk_event("r1", 1, "y", finish_reason="bogus"),
            chunk_event("r2", 0, "fine"),
        )
        await wait_until_async(lambda: bridge.malformed_chunks == 2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            for _ in range(200):  # bounded: until the well-formed one has reached the registry (on the loop)
                metrics = (await client.get("/metrics")).text
                if metric(metrics, "oss_dropped_chunks_total", 0) >= 1:
                    break
                await asyncio.sleep(0.01)
        node.push(STOP)
        await wait_until_async(lambda: not reader_of(bridge).is_alive())
    assert metric(metrics, "oss_malformed_chunks_total") == 2
    assert metric(metrics, 'oss_dropped_chunks_total{reason="unknown"}') == 1  # the well-formed one, for no request


# -- the model node is gone ----------------------------------------------------------


async def test_the_last_answer_input_closing_means_lost() -> None:
    node = FakeNode(inputs={ANSWERS: {"source": "model/chunks"}, "tick": "dora/timer/millis/500"})
    bridge, rec = await started(node)
    from openai_stream_server.backend import DownstreamRequest

    bridge.submit(DownstreamRequest("r1", ["<|user|>\n<|im_start|>\nhi"], {"request_id": "r1"}))
    assert [s[0] for s in node.sent] == ["v1/chat/completions"]

    node.push({"type": "INPUT_CLOSED", "id": "tick"})  # a timer closing is no news about the model
    node.push({"type": "INPUT_CLOSED", "id": ANSWERS})
    await wait_until_async(lambda: len(rec.lost) == 1)
    assert isinstance(rec.lost[0], BackendUnavailable) and ANSWERS in rec.lost[0].message
    health = bridge.health()
    assert health["connected"] is False and "gone" in health["error"]
    with pytest.raises(BackendUnavailable):
        bridge.submit(DownstreamRequest("r2", ["<|user|>\n<|im_start|>\nhi"], {"request_id": "r2"}))
    bridge.cancel("r1")  # nobody left to tell: nothing is sent, nothing raised
    assert len(node.sent) == 1
    await ended(bridge, node)
    assert len(rec.lost) == 1 and rec.stops == 1


# -- the bounded hand-over -------------------------------------------------------------


async def test_the_reader_waits_when_the_loop_is_behind_and_resumes_when_it_catches_up() -> None:
    total = MAX_BATCHES_IN_FLIGHT * 2 + 10
    node = FakeNode(batch=False)  # one event per batch
    node.push(*(chunk_event("r", seq, f"t{seq}") for seq in range(total)))
    bridge, rec = await started(node)
    # This test's code now blocks the loop thread: no callback runs, so no batch is delivered.
    assert wait_for(lambda: node.next_calls >= MAX_BATCHES_IN_FLIGHT + 1)
    reader_of(bridge).join(0.3)  # a bounded look: it must be waiting, not reading on
    assert node.next_calls == MAX_BATCHES_IN_FLIGHT + 1  # the 65th batch waits for a slot
    assert rec.batches == []
    # Let the loop run: it delivers, each delivery frees a slot, the reader goes on.
    await wait_until_async(lambda: len(rec.chunks) == total)
    assert [c.seq for c in rec.chunks] == list(range(total))
    await ended(bridge, node)


@contextmanager
def stalled_loop(node: FakeNode) -> Iterator[tuple[asyncio.AbstractEventLoop, DoraBridge, Recorder]]:
    """A bridge whose loop never runs again after ``start``: the reader fills its slots and waits."""
    loop = asyncio.new_event_loop()
    try:
        bridge, rec = DoraBridge(node), Recorder()
        loop.run_until_complete(bridge.start(rec.sink, rec.on_stop, rec.on_lost))
        # Only now, with the loop stopped for good, is there anything to read.
        node.push(*(chunk_event("r", seq, "x") for seq in range(MAX_BATCHES_IN_FLIGHT * 2)))
        assert wait_for(lambda: node.next_calls >= MAX_BATCHES_IN_FLIGHT + 1)
        reader_of(bridge).join(0.2)  # a bounded look: it is waiting for a slot
        assert reader_of(bridge).is_alive() and node.next_calls == MAX_BATCHES_IN_FLIGHT + 1 and rec.batches == []
        yield loop, bridge, rec
    finally:
        if not loop.is_closed():
            loop.close()


def test_shutdown_while_the_reader_waits_for_the_loop_does_not_hang() -> None:
    node = FakeNode(batch=False)
    with stalled_loop(node) as (_, bridge, _):
        asyncio.run(bridge.aclose())  # another loop: the bridge's own is stuck
        reader = reader_of(bridge)
        reader.join(5)
        assert not reader.is_alive()
        assert node.next_calls == MAX_BATCHES_IN_FLIGHT + 1  # it stopped waiting, and read no further


def test_a_closed_loop_releases_a_waiting_reader() -> None:
    node = FakeNode(batch=False)
    with stalled_loop(node) as (loop, bridge, rec):
        loop.close()
        reader = reader_of(bridge)
        reader.join(5)
        assert not reader.is_alive() and rec.stops == 0
        assert node.next_calls == MAX_BATCHES_IN_FLIGHT + 1


# -- the batch form (docs/architecture.md, "Batch form") ---------------------------------


def batch_event(request_ids: list[str], seqs: list[int], texts: list[str], fins: list[bool]) -> dict[str, Any]:
    value = pa.StructArray.from_arrays(
        [
            pa.array(request_ids, type=pa.string()),
            pa.array(seqs, type=pa.int64()),
            pa.array(texts, type=pa.string()),
            pa.array(fins, type=pa.bool_()),
        ],
        names=["request_id", "seq", "text", "fin"],
    )
    return {"type": "INPUT", "id": ANSWERS, "value": value, "metadata": {}}


async def test_batch_single_and_legacy_messages_mixed_become_one_list_of_chunks_in_order() -> None:
    node = FakeNode()
    node.push(
        batch_event(["a", "b"], [0, 0], ["a0", "b0"], [False, False]),
        chunk_event("c", 0, "c0"),
        {"type": "INPUT", "id": ANSWERS, "value": pa.array(["whole"], type=pa.string()), "metadata": {}},  # legacy
        batch_event(["b", "a"], [1, 1], ["b1", ""], [False, True]),
        STOP,
    )
    bridge, rec = await started(node)
    await wait_until_async(lambda: rec.stops == 1)
    await ended(bridge, node)
    assert [(c.request_id, c.seq, c.text, c.fin) for c in rec.chunks] == [
        ("a", 0, "a0", False),
        ("b", 0, "b0", False),
        ("c", 0, "c0", False),
        (None, None, "whole", True),
        ("b", 1, "b1", False),
        ("a", 1, "", True),
    ]
    assert rec.chunks[-1].finish_reason == "stop" and bridge.malformed_chunks == 0


async def test_a_malformed_batch_is_dropped_and_counted_and_the_reader_reads_on() -> None:
    node = FakeNode()
    bridge = DoraBridge(node)
    app = create_app(Settings(sweep_interval_s=0.02), bridge)
    no_seq = pa.StructArray.from_arrays(
        [pa.array(["r1", "r2"], type=pa.string()), pa.array(["x", "y"], type=pa.string()), pa.array([False, True])],
        names=["request_id", "text", "fin"],
    )
    async with app.router.lifespan_context(app):
        node.push({"type": "INPUT", "id": ANSWERS, "value": no_seq, "metadata": {}})
        await wait_until_async(lambda: bridge.malformed_chunks == 2)  # both rows dropped
        node.push(batch_event(["nobody"], [0], ["after"], [False]))  # read on: a well-formed batch for no request
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:
            for _ in range(200):  # bounded: until the well-formed batch has reached the registry (on the loop)
                metrics = (await client.get("/metrics")).text
                if metric(metrics, "oss_dropped_chunks_total", 0) >= 1:
                    break
                await asyncio.sleep(0.01)
        assert reader_of(bridge).is_alive()
        node.push(STOP)
        await wait_until_async(lambda: not reader_of(bridge).is_alive())
    assert metric(metrics, "oss_malformed_chunks_total") == 2
    assert metric(metrics, 'oss_dropped_chunks_total{reason="unknown"}') == 1
