"""The registry's side of the store: what is written when, and completions read back (docs/store.md).

``RecordKeeper`` sits beside the ``StreamRegistry`` when the store outlives the process (SQLite,
Redis): the registry tells it when a completion went downstream (``opened``), when chunks were
delivered (``delivered``, a shared store only), when one ended (``ended``) and when one was deleted
(``discarded``); none of these waits. A by-id lookup that misses the registry's memory asks the
keeper (``lookup``), which reads the record and rebuilds a read-only completion from it, or, for a
completion another process is still running on a shared store, a mirror that follows that
process's live log. Control messages from other processes (cancel, delete) reach the registry here.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from ..errors import ApiError
from ..state import StreamState
from .base import CANCEL, DELETE, LogBatch, Store, StoreUnavailable
from .record import IN_PROGRESS, RESTARTED_CODE, CompletionRecord
from .snapshot import extend, finish, record_of, state_of

logger = logging.getLogger(__name__)

CANCEL_WAIT_S = 2.0
"""A cancel of another process's completion waits this long for the end to come back through the store."""
MISS_WAIT_S = 0.3
"""On a shared store, an id with no record is read again for this long before it is unknown: another server process
may have answered its 202 (or its first chunk) a moment before its write of the opened record reached Redis, and the
client's next request reached this process (docs/architecture.md, "Several server processes")."""


class SharedStoreUnavailable(ApiError):
    """The store that holds a completion this process does not cannot be read now (Redis lost)."""

    status, error_type, code = 503, "server_error", "store_unavailable"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class InFlightElsewhere(ApiError):
    """Another server process runs it, and the store does not share live answers (SQLite)."""

    status, error_type, code = 503, "server_error", "in_flight_elsewhere"

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


def persisted(state: StreamState) -> bool:
    """Whether a completion is written to the store: all but a Responses ``store: false`` response."""
    return bool(getattr(state.surface_data.context, "store", True))


def stored(state: StreamState) -> bool:
    """Whether it is a stored response (Responses ``store: true``): kept for the stored-response TTL."""
    return bool(getattr(state.surface_data.context, "store", False))


def _died_in_flight(record: CompletionRecord) -> bool:
    """Read back ``failed`` because its process is gone (``CompletionRecord.settled``), with no pieces of its own."""
    return record.error is not None and record.error.code == RESTARTED_CODE and not record.pieces


class RecordKeeper:
    def __init__(self, store: Store) -> None:
        self.store = store
        self.live_logs = store.shared
        """Whether ``delivered`` is called: only a shared store carries live answer logs."""
        self._mirrors: dict[str, StreamState] = {}
        """Completions other processes run that a client here follows, by id; each fed by one tail task."""
        self._owners: dict[str, str] = {}
        """Mirror id -> the instance that runs it: where a cancel goes."""
        self._tasks: set[asyncio.Task[None]] = set()
        self._cancel: Callable[[str], bool] = lambda _: False
        self._delete: Callable[[str], bool] = lambda _: False

    def attach(self, cancel: Callable[[str], bool], delete: Callable[[str], bool]) -> None:
        """What a control message from another process does here: the registry's ``cancel`` and ``delete``."""
        self._cancel, self._delete = cancel, delete
        self.store.on_control(self._on_control)

    async def start(self) -> None:
        await self.store.start()

    async def aclose(self) -> None:
        """Stop following other processes' completions, then flush and close the store."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=3)
        await self.store.aclose()

    def health(self) -> dict[str, Any]:
        problem = self.store.problem()
        return {"backend": self.store.name, "ok": problem is None, **({"problem": problem} if problem else {})}

    # -- from the registry (never waits) -----------------------------------------------------

    def opened(self, state: StreamState) -> None:
        """It went downstream: a small record, so that a crash leaves it ``failed``, not missing."""
        if persisted(state):
            self.store.put(record_of(state, stored=stored(state)))

    def delivered(self, touched: dict[StreamState, int]) -> None:
        """One delivered batch: each completion it extended, with its first new piece, goes to the live log."""
        append = self.store.append
        for state, start in touched.items():
            end = len(state.log.pieces)
            if end <= start or not persisted(state):
                continue
            calls, thoughts = state.log.tool_calls, state.log.reasoning
            batch_calls = {i: calls[i] for i in range(start, end) if i in calls} if calls else {}
            batch_thoughts = {i for i in range(start, end) if i in thoughts} if thoughts else set()
            append(state.request_id, LogBatch(start, state.log.pieces[start:end], batch_calls, batch_thoughts))

    def ended(self, state: StreamState) -> None:
        if persisted(state):
            self.store.put(record_of(state, stored=stored(state)))

    def discarded(self, request_id: str) -> None:
        self.store.discard(request_id)

    # -- lookups -------------------------------------------------------------------------------

    async def lookup(self, request_id: str) -> StreamState | None:
        """The completion from the store: rebuilt if it has ended, a mirror if another process runs it.

        ``SharedStoreUnavailable`` when the store cannot answer; ``InFlightElsewhere`` for a completion
        another live process runs on a store without live logs.
        """
        mirror = self._mirrors.get(request_id)
        if mirror is not None:
            return mirror
        try:
            record = await self.store.get(request_id)
            if record is None and self.store.shared:
                record = await self._read_again(request_id)
        except StoreUnavailable as exc:
            raise SharedStoreUnavailable(f"cannot read completion {request_id!r} now: {exc}") from exc
        if record is None:
            return None
        if record.ended:
            if self.store.shared and _died_in_flight(record):
                return await self._recover(record)
            return state_of(record)
        if record.instance == self.store.instance_id:  # ours, yet not in memory: it cannot still be running
            return state_of(record.settled())
        if not self.store.shared:
            raise InFlightElsewhere(
                f"completion {request_id!r} is in flight on another server process; with --store {self.store.name} "
                "only ended completions are shared (a shared store, redis://, follows live ones)"
            )
        mirror = self._mirrors.get(request_id)  # another lookup may have made one meanwhile
        if mirror is None:
            mirror = self._follow(record)
        return mirror

    async def _read_again(self, request_id: str) -> CompletionRecord | None:
        """The record, read again for up to ``MISS_WAIT_S`` (each wait twice the last): a write in flight lands."""
        deadline = asyncio.get_running_loop().time() + MISS_WAIT_S
        pause = 0.01
        while (left := deadline - asyncio.get_running_loop().time()) > 0:
            await asyncio.sleep(min(pause, left))
            record = await self.store.get(request_id)
            if record is not None:
                return record
            pause *= 2
        return None

    async def _recover(self, record: CompletionRecord) -> StreamState:
        """A completion whose server process died in flight: its record holds no pieces, its live log what was delivered.

        The log goes into the state, which ends as the record reads (failed: the server restarted), and the record is
        written back with those pieces, so that later readers need no log: a client of a killed server process that
        reattaches anywhere gets what was logged, then the error (docs/architecture.md, "Several server processes").
        """
        state = state_of(dataclasses.replace(record, status=IN_PROGRESS, finish_reason=None, error=None))
        try:
            async for item in self.store.tail(record.id):
                if isinstance(item, LogBatch):
                    extend(state, item)
                else:
                    finish(state, item)
        except StoreUnavailable as exc:
            raise SharedStoreUnavailable(f"cannot read completion {record.id!r} now: {exc}") from exc
        if not state.done:
            finish(state, record)
        if state.log.pieces:
            self.store.put(record_of(state, stored=record.stored))
        return state

    def _follow(self, record: CompletionRecord) -> StreamState:
        mirror = state_of(record)
        self._mirrors[record.id] = mirror
        self._owners[record.id] = record.instance
        task = asyncio.get_running_loop().create_task(self._tail(mirror), name=f"oss-tail-{record.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return mirror

    async def _tail(self, mirror: StreamState) -> None:
        request_id = mirror.request_id
        try:
            async for item in self.store.tail(request_id, len(mirror.log.pieces) - 1):
                if isinstance(item, LogBatch):
                    extend(mirror, item)
                else:
                    finish(mirror, item)
        except StoreUnavailable as exc:
            mirror.fail(SharedStoreUnavailable(f"lost the store while following completion {request_id!r}: {exc}"))
        except asyncio.CancelledError:
            mirror.fail(SharedStoreUnavailable("the server is shutting down"))
            raise
        except Exception:
            logger.exception("following completion %s failed", request_id)
            mirror.fail(SharedStoreUnavailable(f"following completion {request_id!r} failed"))
        finally:
            self._mirrors.pop(request_id, None)
            self._owners.pop(request_id, None)
            if not mirror.done:
                mirror.fail(SharedStoreUnavailable(f"completion {request_id!r} ended without its record"))

    async def cancel_elsewhere(self, request_id: str) -> bool:
        """Ask the process that runs a mirrored completion to cancel it; waits briefly for the end to come back."""
        mirror = self._mirrors.get(request_id)
        owner = self._owners.get(request_id)
        if mirror is None or owner is None or mirror.done:
            return False
        try:
            await self.store.send_control(owner, CANCEL, request_id)
        except StoreUnavailable as exc:
            raise SharedStoreUnavailable(f"cannot reach the process that runs {request_id!r}: {exc}") from exc
        try:
            await asyncio.wait_for(mirror.wait_done(), CANCEL_WAIT_S)
        except TimeoutError:
            pass
        return True

    # -- from other processes --------------------------------------------------------------------

    def _on_control(self, op: str, request_id: str) -> None:
        if op == CANCEL:
            self._cancel(request_id)
        elif op == DELETE:
            self._delete(request_id)
