"""An unexpected exception on the way from dora to a stream is contained: one chunk is lost, not the server.

Before, an exception in the reader thread ended it (and with it the HTTP server), and one raised
by the sink (``StreamRegistry.deliver``) lost the rest of its batch uncounted. Now the chunk it
was on counts as malformed (``oss_malformed_chunks_total``), the error is logged at most once a
while, the rest of the batch is delivered and reading goes on.
"""

from __future__ import annotations

import logging
import queue
from typing import Any

import httpx
import pyarrow as pa
import pytest

from openai_stream_protocol import Chunk
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.app import create_app
from openai_stream_server.bridge import DoraBridge
from openai_stream_server.settings import Settings
from tests.live import metric

pytestmark = pytest.mark.timeout(30)

ANSWERS = "v1/chat/completions"
STOP = {"type": "STOP"}


class QueuedNode:
    """The dora calls the bridge makes: ``next`` waits (bounded) for an event, ``drain`` takes all that are queued."""

    def __init__(self) -> None:
        self._events: queue.Queue[dict[str, Any]] = queue.Queue()

    def push(self, *events: dict[str, Any]) -> None:
        for event in events:
            self._events.put(event)

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        try:
            return self._events.get(timeout=5.0)
        except queue.Empty:
            return None

    def drain(self) -> list[dict[str, Any]]:
        drained = []
        while not self._events.empty():
            drained.append(self._events.get_nowait())
        return drained

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        pass


def chunk_event(request_id: str, seq: int, text: str, **fields: Any) -> dict[str, Any]:
    event = {"type": "INPUT", "id": ANSWERS, "value": pa.array([text], type=pa.string())}
    event["metadata"] = {"request_id": request_id, "seq": seq}
    event.update(fields)
    return event


class PickySink:
    """A sink (as ``StreamRegistry.deliver`` is) that raises on every chunk whose text is ``boom``."""

    def __init__(self) -> None:
        self.delivered: list[str] = []
        self.stops = 0

    def __call__(self, batch: list[Chunk]) -> None:
        for chunk in batch:
            if chunk.text == "boom":
                raise RuntimeError("a bug in deliver")
            self.delivered.append(chunk.text)

    def on_stop(self) -> None:
        self.stops += 1


async def started(node: QueuedNode, sink: PickySink) -> DoraBridge:
    bridge = DoraBridge(node)
    await bridge.start(sink, sink.on_stop, lambda error: None)
    return bridge


async def stopped(bridge: DoraBridge, node: QueuedNode) -> None:
    node.push(STOP)
    thread = bridge._thread
    assert thread is not None
    await wait_until_async(lambda: not thread.is_alive(), what="the reader to end")


async def test_a_sink_that_raises_on_one_chunk_loses_only_that_chunk_and_logs_once(caplog: pytest.LogCaptureFixture) -> None:
    node, sink = QueuedNode(), PickySink()
    node.push(*[chunk_event("r1", i, text) for i, text in enumerate(["a", "boom", "b", "boom", "boom", "c"])])
    with caplog.at_level(logging.ERROR, logger="openai_stream_server.bridge"):
        bridge = await started(node, sink)  # the six arrive as one batch (next, then drain)
        await wait_until_async(lambda: sink.delivered == ["a", "b", "c"], what="the rest of the batch")
        node.push(chunk_event("r1", 6, "later"))
        await wait_until_async(lambda: sink.delivered[-1:] == ["later"], what="the next batch")
    assert bridge.malformed_chunks == 3 and sink.stops == 0 and not bridge.stopped
    assert len([r for r in caplog.records if r.levelno >= logging.ERROR]) == 1  # rate-limited: once, not per chunk
    await stopped(bridge, node)


@pytest.mark.parametrize(
    "odd",
    [
        pytest.param({"metadata": None}, id="metadata-none"),
        pytest.param({"value": None}, id="value-none"),
    ],
)
async def test_an_event_the_reader_trips_on_is_counted_and_reading_goes_on(odd: dict[str, Any]) -> None:
    node, sink = QueuedNode(), PickySink()
    node.push(chunk_event("r1", 0, "a"), chunk_event("r1", 1, "odd", **odd), chunk_event("r1", 2, "b"))
    bridge = await started(node, sink)
    await wait_until_async(lambda: sink.delivered == ["a", "b"], what="the rest of the batch")
    node.push(chunk_event("r1", 3, "later"))
    await wait_until_async(lambda: sink.delivered[-1:] == ["later"], what="the next batch")
    assert bridge.malformed_chunks == 1 and sink.stops == 0 and not bridge.stopped
    await stopped(bridge, node)


class FragileRequests(dict[str, Any]):
    """The registry's requests in flight, with a bug: looking up ``poison`` raises."""

    def get(self, key: str, default: Any = None) -> Any:
        if key == "poison":
            raise KeyError("a bug in the registry")
        return super().get(key, default)


async def test_an_exception_in_the_registry_is_exported_and_the_server_keeps_serving(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = QueuedNode()
    bridge = DoraBridge(node)
    app = create_app(Settings(sweep_interval_s=0.02), bridge)
    monkeypatch.setattr(app.state.registry, "active", FragileRequests())
    async with app.router.lifespan_context(app):
        node.push(chunk_event("poison", 0, "x"), chunk_event("nobody", 0, "fine"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://127.0.0.1") as client:

            async def dropped() -> str | None:  # both chunks have reached the registry (on the loop)
                text = (await client.get("/metrics")).text
                return text if metric(text, "oss_dropped_chunks_total", 0) >= 1 else None

            metrics = await wait_until_async(dropped, what="the batch to reach the registry")
            health = await client.get("/health")
        assert not app.state.stopped.is_set() and not bridge.stopped and health.status_code == 200
        await stopped(bridge, node)
    assert metric(metrics, "oss_malformed_chunks_total") == 1
    assert metric(metrics, 'oss_dropped_chunks_total{reason="unknown"}') == 1  # "fine", after the one that raised
