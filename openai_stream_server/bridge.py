"""The dora bridge: owns the ``dora.Node`` (docs/architecture.md, Architecture, room 3).

One thread blocks on ``node.next()`` (it releases the GIL), takes whatever
else is queued with ``node.drain()`` (up to 25 % more throughput than one
hand-over per event, docs/architecture.md) and hands the batch to the event loop with
``loop.call_soon_threadsafe``. ``send_output`` is called from the loop thread
only. Dora and pyarrow errors become ``BackendUnavailable`` here, so the HTTP
layer never names a dora type.

The hand-over is bounded: at most ``MAX_BATCHES_IN_FLIGHT`` batches wait in
the loop's callback queue. Past that the reader waits for the loop to catch
up, and the chunks it has not read wait in dora's own input queue (whose
``queue_size`` and ``queue_policy`` the dataflow sets), not in our memory.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from openai_stream_protocol import (
    CANCEL_OUTPUT,
    REQUEST_OUTPUT,
    Chunk,
    is_batch,
    parse_batch,
    parse_chunk,
    string_array,
    texts_of,
)

from .backend import ChunkSink, DownstreamRequest, OnLost
from .errors import BackendUnavailable

logger = logging.getLogger(__name__)


MAX_BATCHES_IN_FLIGHT = 64
"""Batches handed to the event loop and not yet delivered, at most; then the reader thread waits.

Each batch is everything dora had queued at one wake-up, so a loop that keeps up holds one or two;
64 only comes into play when the loop falls behind (a burst of slow clients, a long GC pause), and
then waiting costs nothing: the next ``drain()`` takes more at once, which is cheaper per chunk.
"""

SLOT_WAIT_S = 0.1
"""How long one wait for a free slot lasts before the reader checks whether the bridge stopped."""


def _is_tick(input_id: str) -> bool:
    return input_id == "tick" or input_id.startswith("dora/timer")


class DoraBridge:
    def __init__(self, node: Any) -> None:
        self._node = node
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.stopped = False
        self.lost: str | None = None
        """Why the model nodes are gone (every answer input closed), else None."""
        self._answer_inputs: set[str] | None = None
        self.last_event_at: float | None = None
        self.malformed_chunks = 0
        self._slots = threading.Semaphore(MAX_BATCHES_IN_FLIGHT)
        """One per batch handed to the loop and not yet delivered (``MAX_BATCHES_IN_FLIGHT``)."""

    async def start(self, sink: ChunkSink, on_stop: Callable[[], None], on_lost: OnLost) -> None:
        self._loop = asyncio.get_running_loop()
        self._answer_inputs = _answer_inputs(self._node)
        self._thread = threading.Thread(target=self._read, args=(sink, on_stop, on_lost), name="dora-reader", daemon=True)
        self._thread.start()

    def _read(self, sink: ChunkSink, on_stop: Callable[[], None], on_lost: OnLost) -> None:
        assert self._loop is not None
        node, loop, slots = self._node, self._loop, self._slots

        def deliver(batch: list[Chunk]) -> None:  # on the loop thread
            try:
                sink(batch)
            finally:
                slots.release()

        try:
            while True:
                event = node.next()
                if event is None:
                    break
                events = [event]
                if event["type"] != "STOP":
                    try:
                        events.extend(node.drain())
                    except RuntimeError:  # the channel closed after this event: the dataflow is stopping
                        pass
                self.last_event_at = time.monotonic()
                batch: list[Chunk] = []
                stop = lost = False
                for ev in events:
                    kind = ev["type"]
                    if kind == "INPUT":
                        if _is_tick(ev["id"]):
                            continue
                        value = ev["value"]
                        if is_batch(value):
                            # One message, one chunk per row of many requests (docs/architecture.md, "Batch form").
                            try:
                                batch.extend(parse_batch(value))
                            except (ValueError, TypeError, KeyError) as exc:
                                self.malformed_chunks += max(1, len(value))  # every row is a chunk dropped
                                logger.warning("dropping a malformed batch of %d on %s: %r", len(value), ev["id"], str(exc))
                            continue
                        try:
                            batch.append(parse_chunk(texts_of(value), ev["metadata"]))
                        except (ValueError, TypeError, IndexError) as exc:
                            self.malformed_chunks += 1
                            logger.warning("dropping a malformed chunk on %s: %r", ev["id"], str(exc))  # %r: one log line
                    elif kind == "STOP":
                        stop = True
                    elif kind == "INPUT_CLOSED":
                        lost = self._closed(ev["id"]) or lost
                    elif kind == "ERROR":
                        logger.error("dora error event: %r", ev.get("error"))
                if batch:
                    if not slots.acquire(blocking=False) and not self._wait_for_slot(loop):
                        break  # stopped, or the loop is gone: nobody left to deliver to
                    loop.call_soon_threadsafe(deliver, batch)
                if lost and not stop:
                    loop.call_soon_threadsafe(on_lost, BackendUnavailable(self.lost or "the model node is gone"))
                if stop:
                    break
        except Exception:
            logger.exception("the dora reader thread failed")
        finally:
            self.stopped = True
            if not loop.is_closed():
                loop.call_soon_threadsafe(on_stop)

    def _wait_for_slot(self, loop: asyncio.AbstractEventLoop) -> bool:
        """The loop is ``MAX_BATCHES_IN_FLIGHT`` batches behind: wait until it delivers one; False if it never will."""
        while not self.stopped and not loop.is_closed():
            if self._slots.acquire(timeout=SLOT_WAIT_S):
                return True
        return False

    def _closed(self, input_id: str) -> bool:
        """An input closed; True when it was the last one that carries answers (the model node exited)."""
        if self._answer_inputs is None or input_id not in self._answer_inputs:
            return False
        self._answer_inputs.discard(input_id)
        if self._answer_inputs or self.lost is not None:
            return False
        self.lost = f"the model node is gone (input '{input_id}' closed)"
        logger.error("%s: failing requests in flight, refusing new ones", self.lost)
        return True

    def submit(self, request: DownstreamRequest) -> None:
        self._send(REQUEST_OUTPUT, request.texts, request.metadata)

    def cancel(self, request_id: str) -> None:
        if self.lost is not None:
            return  # nobody left to tell
        try:
            self._send(CANCEL_OUTPUT, [request_id], {"request_id": request_id})
        except BackendUnavailable:
            logger.warning("could not send cancel for %s", request_id)

    def _send(self, output: str, texts: list[str], metadata: dict[str, Any]) -> None:
        if self.stopped:
            raise BackendUnavailable("the dora dataflow has stopped")
        if self.lost is not None:
            raise BackendUnavailable(self.lost)
        try:
            self._node.send_output(output, string_array(texts), metadata)
        except Exception as exc:  # dora raises RuntimeError / pyo3 exceptions
            raise BackendUnavailable(f"could not send to the dataflow: {exc}") from exc

    def health(self) -> dict[str, Any]:
        age = None if self.last_event_at is None else round(time.monotonic() - self.last_event_at, 3)
        status: dict[str, Any] = {"connected": not self.stopped and self.lost is None, "last_event_age_s": age}
        if self.lost is not None:
            status["error"] = self.lost
        return status

    async def aclose(self) -> None:
        self.stopped = True


def _answer_inputs(node: Any) -> set[str] | None:
    """The inputs that carry answers (all but timers), from the node's dataflow config; None if unknown.

    When every one of them has closed, the nodes that answer have exited (a crash, say): dora 1.1.0
    keeps the dataflow running for the server (its timer input stays open), so without this a
    client would wait out the first-chunk or idle timeout (tests/e2e/test_robustness.py).
    """
    try:
        inputs = node.node_config()["inputs"]
    except Exception:  # older dora, or a test double
        return None
    answers: set[str] = set()
    for input_id, source in inputs.items():
        name = source.get("source", "") if isinstance(source, dict) else str(source)
        if not _is_tick(input_id) and not name.startswith("dora/"):
            answers.add(input_id)
    return answers or None
