"""Test helpers for the wire protocol: a recording fake dora node and bounded polling.

For this project's tests and for node authors' own: a node under test is
given a ``RecordingNode`` where it expects a ``dora.Node``; what it sends is
kept as ``(output_id, data, metadata)`` and read back as chunks, texts or
metadata. Like the rest of the package this imports pyarrow and the standard
library only (no pytest, no dora), so it works in any test runner.

Waiting: tests synchronise on what they need to be true, not on a time. A
``sleep`` followed by an assertion passes or fails with the machine's load;
polling the condition itself with a bounded deadline is faster on an idle
machine and correct on a starved one.

- ``wait_for(predicate, timeout_s)`` returns ``True`` once the predicate is
  truthy, ``False`` after ``timeout_s``: for a test that asserts on the
  result (``assert wait_for(...)``) or checks that something does *not*
  happen (``assert not wait_for(..., 0.2)``).
- ``wait_until(predicate, timeout_s, what=...)`` returns the predicate's first
  truthy value and raises ``AssertionError`` naming ``what`` and the last
  value on timeout, so a forgotten ``assert`` cannot hide a timeout.
- ``wait_until_async`` is ``wait_until`` for a test running on an event loop
  (the predicate may be sync or async; the loop keeps running between polls).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, NamedTuple, TypeVar

import pyarrow as pa

from ._batch import is_batch, parse_batch
from ._chunk import Chunk, parse_chunk
from ._status import NodeStatus, is_status, parse_status
from ._wire import HELLO_KEY, request_id_of, texts_of

__all__ = ["RecordingNode", "Sent", "wait_for", "wait_until", "wait_until_async"]

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_INTERVAL_S = 0.005


class Sent(NamedTuple):
    """One ``send_output`` call as the node made it (the array itself, not a copy)."""

    output_id: str
    data: pa.Array
    metadata: dict[str, Any]

    @property
    def is_hello(self) -> bool:
        """The node's start-up hello (``send_hello``): never a chunk."""
        return HELLO_KEY in self.metadata

    @property
    def is_status(self) -> bool:
        """A hello or a heartbeat (``_status.py``): never a chunk."""
        return is_status(self.metadata)


class RecordingNode:
    """Stands in for ``dora.Node``: records ``send_output`` and, if given events, replays them.

    ``sent`` holds every call in order (thread-safe: schedulers send from
    worker threads). The readers take an optional ``output_id`` filter and
    understand both chunk forms: a string array with per-message metadata
    (``ChunkSender``) and a struct array with one row per chunk
    (``BatchSender``). Hellos and heartbeats are skipped by the chunk readers
    (``statuses`` reads them); pass
    ``output_id`` when the node also sends non-chunk outputs (a cancel
    message would otherwise read as a chunk).

    ``events`` (dicts shaped like dora's: ``type``, ``id``, ``value``,
    ``metadata``) are returned by ``next()`` and by iteration, for a node
    whose main loop reads the node itself.
    """

    def __init__(self, events: Iterable[dict[str, Any]] = ()) -> None:
        self.sent: list[Sent] = []
        self._lock = threading.Lock()
        self._events = iter(events)

    # -- what dora.Node offers ---------------------------------------------------------------------

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        with self._lock:
            self.sent.append(Sent(output_id, data, dict(metadata or {})))

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        """The next scripted event, ``None`` when there are no more (as dora does once the inputs close)."""
        return next(self._events, None)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self._events

    # -- reading back ------------------------------------------------------------------------------

    def messages(self, output_id: str | None = None) -> list[Sent]:
        """The calls so far (a snapshot), optionally only those on ``output_id``."""
        with self._lock:
            sent = list(self.sent)
        return [s for s in sent if output_id is None or s.output_id == output_id]

    def values(self, output_id: str | None = None) -> list[list[Any]]:
        """Each message's data as Python values (``to_pylist``)."""
        return [s.data.to_pylist() for s in self.messages(output_id)]

    def texts(self, output_id: str | None = None) -> list[str]:
        """Each string-array message's elements joined (a chunk's delta text); batches and hellos skipped."""
        return ["".join(texts_of(s.data)) for s in self.messages(output_id) if not is_batch(s.data) and not s.is_status]

    def metadata(self, output_id: str | None = None) -> list[dict[str, Any]]:
        """Each message's metadata, in sending order."""
        return [s.metadata for s in self.messages(output_id)]

    def chunks(self, request_id: str | None = None, output_id: str | None = None) -> list[Chunk]:
        """Every chunk sent, in order, batches unpacked; only ``request_id``'s when given."""
        out: list[Chunk] = []
        for s in self.messages(output_id):
            if s.is_status:
                continue
            if is_batch(s.data):
                out.extend(parse_batch(s.data))
            else:
                out.append(parse_chunk(texts_of(s.data), s.metadata))
        return [c for c in out if request_id is None or c.request_id == request_id]

    def statuses(self, output_id: str | None = None) -> list[NodeStatus]:
        """The hellos and heartbeats sent, in order."""
        return [status for s in self.messages(output_id) if (status := parse_status(s.metadata)) is not None]

    def text(self, request_id: str, output_id: str | None = None) -> str:
        """The answer text of ``request_id`` so far: its chunks' texts joined."""
        return "".join(c.text for c in self.chunks(request_id, output_id))

    def request_ids(self, output_id: str | None = None) -> list[str]:
        """The request each non-batch message names (``request_id``, else ``session_id``), in order."""
        ids = (request_id_of(s.metadata) for s in self.messages(output_id) if not is_batch(s.data) and not s.is_status)
        return [i for i in ids if i is not None]

    def clear(self) -> None:
        with self._lock:
            self.sent.clear()


# -- waiting -----------------------------------------------------------------------------------------


def _timed_out(what: str, timeout_s: float, last: Any) -> AssertionError:
    return AssertionError(f"timed out after {timeout_s:g} s waiting for {what} (last value: {last!r})")


def _poll(predicate: Callable[[], T], timeout_s: float, interval_s: float) -> tuple[bool, T]:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return True, value
        if time.monotonic() >= deadline:
            return False, value
        time.sleep(interval_s)


def wait_for(
    predicate: Callable[[], object], timeout_s: float = DEFAULT_TIMEOUT_S, *, interval_s: float = DEFAULT_INTERVAL_S
) -> bool:
    """Poll ``predicate`` until it is truthy (``True``) or ``timeout_s`` has passed (``False``).

    The predicate is always called at least once, also with ``timeout_s=0``.
    """
    return _poll(predicate, timeout_s, interval_s)[0]


def wait_until(
    predicate: Callable[[], T],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    what: str = "the condition",
) -> T:
    """Poll ``predicate`` until it is truthy and return that value; ``AssertionError`` naming ``what`` on timeout."""
    ok, value = _poll(predicate, timeout_s, interval_s)
    if not ok:
        raise _timed_out(what, timeout_s, value)
    return value


async def wait_until_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout_s: float = DEFAULT_TIMEOUT_S,
    *,
    interval_s: float = DEFAULT_INTERVAL_S,
    what: str = "the condition",
) -> T:
    """``wait_until`` on an event loop: the predicate may be a coroutine function; polls with ``asyncio.sleep``."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value  # type: ignore[return-value]
        if time.monotonic() >= deadline:
            raise _timed_out(what, timeout_s, value)
        await asyncio.sleep(interval_s)
