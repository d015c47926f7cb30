"""The store seam: what every back end (memory, SQLite, Redis) offers the server (docs/store.md).

The server writes through ``put`` (an "opened" record at submit, the final one when a completion
ends) and never waits for it: writes are queued and flushed in batches by the back end, and a
failing back end is logged, counted and reported by ``problem``, never raised to a request. Reads
(``get``, ``delete``) are awaited; a back end that cannot answer raises ``StoreUnavailable`` at
once rather than hang.

A shared back end (Redis, ``shared = True``) also carries the live answer log of each completion
(``append`` once per delivered batch, ``tail`` from another process) and control messages between
server processes (``send_control``: cancel or delete a completion another process runs).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from openai_stream_protocol import ToolCallDelta

from .record import CompletionRecord, expired

logger = logging.getLogger(__name__)

DAY_S = 86400.0

CANCEL = "cancel"
DELETE = "delete"
CONTROL_OPS = (CANCEL, DELETE)
"""Control messages one server process sends another about a completion the other runs."""

ControlHandler = Callable[[str, str], None]
"""``handler(op, completion_id)``, called on the event loop when a control message arrives."""


class StoreError(Exception):
    """Base of the store's errors."""


class StoreConfigError(StoreError):
    """The ``--store`` option names something that cannot be used; the message names the option."""


class StoreUnavailable(StoreError):
    """The back end cannot answer now (Redis unreachable): the HTTP layer answers 503."""


@dataclass(frozen=True, slots=True)
class StoreOptions:
    """How long records live, how much a store holds, how often it writes (Settings: ``store_*``)."""

    response_ttl_s: float = 30 * DAY_S
    """Stored responses (Responses API, ``store: true``): OpenAI keeps them 30 days."""
    completion_ttl_s: float = 300.0
    """Everything else (chat and legacy completions, ``store: false`` responses): the server's ``retention_s``."""
    max_bytes: int = 1024 * 1024 * 1024
    """Encoded records held at most; past it the least recently written are evicted first."""
    flush_interval_s: float = 0.5
    """Queued writes are flushed at least this often (a crash loses at most this much)."""
    max_batch: int = 512
    """A flush starts early once this many records are queued."""
    purge_interval_s: float = 60.0
    """How often expired records are deleted (they read as missing from the moment they expire)."""
    max_pending: int = 100_000
    """Records (or log batches) queued while the back end fails at most; beyond it the oldest are dropped, counted."""

    def ttl_s(self, record: CompletionRecord) -> float:
        return self.response_ttl_s if record.stored else self.completion_ttl_s


@dataclass(slots=True)
class StoreStats:
    """Counters a store keeps; ``/metrics`` reads them when it renders (``Metrics.count_from``)."""

    records_written: int = 0
    batches: int = 0
    """Transactions (SQLite) or pipelines (Redis) that wrote queued records or log batches."""
    write_errors: int = 0
    """Flushes that failed (disk full, database locked, Redis lost); their records stay queued for the next."""
    dropped: int = 0
    """Records never written: larger than the whole cap, or queued past ``max_pending`` while the back end failed."""
    evicted: int = 0
    """Records deleted early to stay under ``max_bytes`` (least recently written first)."""
    expired: int = 0
    """Records deleted by the periodic purge after their TTL."""
    log_batches: int = 0
    """Live-log batches appended (Redis)."""


@dataclass(slots=True)
class LogBatch:
    """Pieces appended to a live answer log in one delivery: ``pieces[0]`` is piece number ``start``."""

    start: int
    pieces: list[str]
    tool_calls: dict[int, ToolCallDelta] = field(default_factory=dict)
    """Piece index (of the whole log) -> tool call, for the pieces of this batch that are argument deltas."""
    reasoning: set[int] = field(default_factory=set)
    """Piece indices (of the whole log) of the pieces of this batch that are reasoning."""


class Throttled:
    """Logs a repeated failure at most once per ``interval_s`` (a full disk must not flood the log)."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._last: float | None = None
        self.suppressed = 0

    def warning(self, log: logging.Logger, msg: str, *args: object) -> None:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval_s:
            self.suppressed += 1
            return
        self._last = now
        if self.suppressed:
            msg += " (%d more since the last report)"
            args = (*args, self.suppressed)
        self.suppressed = 0
        log.warning(msg, *args)


def new_instance_id() -> str:
    """A fresh id for this server process: what its records are owned by."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """Who runs an instance: to tell, on the same host, whether it is still alive (its pid)."""

    host: str
    pid: int

    @classmethod
    def here(cls) -> InstanceInfo:
        return cls(socket.gethostname(), os.getpid())

    def running(self) -> bool | None:
        """True/False when it runs on this host (its pid exists or not); None when it is another host's."""
        if self.host != socket.gethostname():
            return None
        if self.pid == os.getpid():
            return True
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # exists, another user's
            return True
        return True


class Store:
    """The seam. Subclasses implement the ``_``-prefixed primitives; the rest is shared."""

    name = "store"
    shared = False
    """True when other server processes see this store's live logs and control messages (Redis)."""
    persistent = False
    """True when records outlive the process (SQLite, Redis)."""

    def __init__(self, options: StoreOptions | None = None, instance_id: str | None = None) -> None:
        self.options = options or StoreOptions()
        self.instance_id = instance_id or new_instance_id()
        self.stats = StoreStats()
        self._control_handlers: list[ControlHandler] = []
        self._warn = Throttled()

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        """Open the back end; ``StoreConfigError`` (naming ``--store``) if it cannot be used."""

    async def flush(self) -> None:
        """Write everything queued so far (awaits the write)."""

    async def aclose(self) -> None:
        """Flush, then release the back end; the store is unusable after."""

    def problem(self) -> str | None:
        """None while healthy, else one sentence for ``/health`` (``degraded``) naming the back end."""
        return None

    # -- records -----------------------------------------------------------

    def put(self, record: CompletionRecord) -> None:
        """Queue ``record`` to be written (replacing one of its id); never blocks, never raises.

        Sets ``expires_at`` from the TTLs and ``instance`` to this process when they are unset.
        """
        if not record.expires_at:
            record.expires_at = time.time() + self.options.ttl_s(record)
        if not record.instance:
            record.instance = self.instance_id
        self._put(record)

    async def get(self, completion_id: str) -> CompletionRecord | None:
        """The record, None if unknown or expired; one left ``in_progress`` by a dead process reads ``failed``.

        ``StoreUnavailable`` when the back end cannot answer.
        """
        record = await self._get(completion_id)
        if record is None or expired(record):
            return None
        if not record.ended and record.instance != self.instance_id and not await self.alive(record.instance):
            return record.settled()
        return record

    async def delete(self, completion_id: str) -> bool:
        """Forget it (and tell its owner process, on a shared store); False if it was not there."""
        return await self._delete(completion_id)

    def discard(self, completion_id: str) -> None:
        """Queue ``delete``: the record goes with the next flush (a queued write of it at once); never blocks or raises."""
        self._discard(completion_id)

    async def alive(self, instance_id: str) -> bool:
        """Whether the server process ``instance_id`` is still running (its records may still change)."""
        return instance_id == self.instance_id

    # -- live logs and control (shared back ends) ----------------------------

    def append(self, completion_id: str, batch: LogBatch) -> None:
        """Queue one delivered batch of a live completion's log (no-op unless ``shared``)."""

    def tail(self, completion_id: str, after: int = -1) -> AsyncIterator[LogBatch | CompletionRecord]:
        """Another process's live log from piece ``after + 1``: batches, then the final record (``shared`` only)."""
        raise StoreUnavailable(f"the {self.name} store holds no live logs of other processes")

    async def send_control(self, instance_id: str, op: str, completion_id: str) -> None:
        """Ask process ``instance_id`` to ``cancel`` or ``delete`` a completion it runs (``shared`` only)."""
        raise StoreUnavailable(f"the {self.name} store cannot reach other server processes")

    def on_control(self, handler: ControlHandler) -> None:
        """Call ``handler(op, id)`` for each control message sent to this process."""
        self._control_handlers.append(handler)

    def _dispatch_control(self, op: str, completion_id: str) -> None:
        for handler in self._control_handlers:
            try:
                handler(op, completion_id)
            except Exception:  # one handler's bug must not stop the listener
                logger.exception("control message %s %s: handler failed", op, completion_id)

    # -- for subclasses ----------------------------------------------------

    def _put(self, record: CompletionRecord) -> None:
        raise NotImplementedError

    async def _get(self, completion_id: str) -> CompletionRecord | None:
        raise NotImplementedError

    async def _delete(self, completion_id: str) -> bool:
        raise NotImplementedError

    def _discard(self, completion_id: str) -> None:
        raise NotImplementedError
