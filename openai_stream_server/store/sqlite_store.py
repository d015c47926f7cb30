"""The SQLite back end: records in one file that outlives the process (``--store sqlite``).

Everything that touches the database runs in ONE worker thread (a single-thread executor owns the
connection), so the event loop never waits on the disk: ``put`` only encodes the record and queues
it; a flusher task hands the queue to the thread at least every ``flush_interval_s`` (earlier once
``max_batch`` records wait), which writes it in one transaction. A graceful stop (``aclose``)
flushes everything; a crash loses at most one flush interval (docs/store.md, "What is written when").

Several server processes may open the same file at once (two dataflows started from one checkout
do): WAL journal, a ``busy_timeout``, ``BEGIN IMMEDIATE`` for writes (a reserved lock, never an
exclusive one), and the running byte total kept by triggers inside each write's own transaction,
so that it stays exact whichever process writes. A write that fails (disk full, database locked
past the busy timeout) keeps its records queued for the next flush, is counted
(``stats.write_errors``) and logged at most once a minute, and never reaches a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .base import InstanceInfo, Store, StoreConfigError, StoreOptions, StoreUnavailable
from .record import CompletionRecord, decode, encode

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS completions (
    id TEXT PRIMARY KEY,
    instance TEXT NOT NULL,
    status TEXT NOT NULL,
    written_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    data BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS completions_by_written_at ON completions (written_at);
CREATE INDEX IF NOT EXISTS completions_by_expires_at ON completions (expires_at);
CREATE TABLE IF NOT EXISTS totals (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES ('bytes', 0);
CREATE TRIGGER IF NOT EXISTS completions_bytes_insert AFTER INSERT ON completions BEGIN
    UPDATE totals SET value = value + length(NEW.data) WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS completions_bytes_update AFTER UPDATE OF data ON completions BEGIN
    UPDATE totals SET value = value + length(NEW.data) - length(OLD.data) WHERE name = 'bytes';
END;
CREATE TRIGGER IF NOT EXISTS completions_bytes_delete AFTER DELETE ON completions BEGIN
    UPDATE totals SET value = value - length(OLD.data) WHERE name = 'bytes';
END;
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at REAL NOT NULL,
    heartbeat REAL NOT NULL
);
"""

_UPSERT = """
INSERT INTO completions (id, instance, status, written_at, expires_at, data) VALUES (?, ?, ?, ?, ?, ?)
ON CONFLICT (id) DO UPDATE SET instance = excluded.instance, status = excluded.status,
    written_at = excluded.written_at, expires_at = excluded.expires_at, data = excluded.data
"""

Row = tuple[str, str, str, float, float, bytes]
"""One row written: (id, instance, status, written_at, expires_at, encoded record)."""


class SqliteStore(Store):
    name = "sqlite"
    persistent = True

    def __init__(
        self,
        path: str | Path,
        options: StoreOptions | None = None,
        instance_id: str | None = None,
        *,
        option_text: str = "",
        busy_timeout_ms: int = 5000,
        heartbeat_s: float = 5.0,
        stale_after_s: float = 30.0,
    ) -> None:
        super().__init__(options, instance_id)
        self.path = Path(path)
        self._option_text = option_text or f"sqlite://{self.path}"
        self._busy_timeout_ms = busy_timeout_ms
        self._heartbeat_s = heartbeat_s
        self._stale_after_s = stale_after_s
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None  # used in the worker thread only
        self._pending: dict[str, CompletionRecord] = {}
        """Queued writes by id: an opened record and its final one queued in the same interval are written (and
        encoded, in the worker thread) once."""
        self._deletes: set[str] = set()
        """Queued deletions (``discard``), done in the next flush after its writes."""
        self._wakeup = asyncio.Event()
        self._flusher: asyncio.Task[None] | None = None
        self._flush_lock = asyncio.Lock()
        self._problem: str | None = None
        self._next_heartbeat = 0.0
        self._next_purge = 0.0
        self._alive_cache: dict[str, tuple[float, bool]] = {}
        self._closed = False

    # -- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oss-sqlite")
        try:
            await self._run(self._open)
        except (OSError, sqlite3.Error) as exc:
            self._executor.shutdown(wait=False)
            self._executor = None
            raise StoreConfigError(f"--store {self._option_text}: cannot open {self.path}: {exc}") from exc
        now = time.monotonic()
        self._next_heartbeat = now + self._heartbeat_s
        self._next_purge = now + self.options.purge_interval_s
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="oss-sqlite-flush")

    async def flush(self) -> None:
        await self._flush_once(force=True)

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
        if self._executor is None:
            return
        await self._flush_once(force=True)
        if self._pending:
            logger.error(
                "sqlite store %s: %d records could not be written before the stop: %s",
                self.path,
                len(self._pending),
                self._problem,
            )
        with contextlib.suppress(sqlite3.Error):
            await self._run(self._close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def problem(self) -> str | None:
        return self._problem

    # -- records -----------------------------------------------------------

    def _put(self, record: CompletionRecord) -> None:
        self._deletes.discard(record.id)
        self._pending[record.id] = record
        if len(self._pending) >= self.options.max_batch:
            self._wakeup.set()

    async def _get(self, completion_id: str) -> CompletionRecord | None:
        if completion_id in self._deletes:  # deleted, not flushed yet
            return None
        queued = self._pending.get(completion_id)
        if queued is not None:
            return queued
        data = await self._read(self._select, completion_id)
        return None if data is None else decode(data)

    async def _delete(self, completion_id: str) -> bool:
        queued = self._pending.pop(completion_id, None) is not None
        return bool(await self._read(self._delete_row, completion_id)) or queued

    def _discard(self, completion_id: str) -> None:
        self._pending.pop(completion_id, None)
        self._deletes.add(completion_id)
        if len(self._deletes) >= self.options.max_batch:
            self._wakeup.set()

    async def alive(self, instance_id: str) -> bool:
        if instance_id == self.instance_id:
            return True
        now = time.monotonic()
        cached = self._alive_cache.get(instance_id)
        if cached is not None and cached[0] > now:
            return cached[1]
        row = await self._read(self._instance_row, instance_id)
        answer = False
        if row is not None:
            host, pid, heartbeat = row
            fresh = time.time() - heartbeat <= self._stale_after_s
            running = InstanceInfo(host, pid).running()
            answer = fresh and running is not False
        if len(self._alive_cache) > 1024:
            self._alive_cache.clear()
        self._alive_cache[instance_id] = (now + 1.0, answer)
        return answer

    # -- on the loop -------------------------------------------------------

    async def _flush_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.options.flush_interval_s)
            self._wakeup.clear()
            try:
                await self._flush_once(force=False)
            except Exception:  # never let the flusher die: the next interval tries again
                logger.exception("sqlite store %s: flush failed", self.path)

    async def _flush_once(self, force: bool) -> None:
        async with self._flush_lock:
            now = time.monotonic()
            heartbeat = now >= self._next_heartbeat
            purge = now >= self._next_purge
            if not (self._pending or self._deletes or heartbeat or purge or force):
                return
            rows, self._pending = self._pending, {}
            deletes, self._deletes = self._deletes, set()
            if heartbeat:
                self._next_heartbeat = now + self._heartbeat_s
            if purge:
                self._next_purge = now + self.options.purge_interval_s
            try:
                evicted, expired, too_large = await self._run(self._write, list(rows.values()), deletes, heartbeat, purge)
            except sqlite3.Error as exc:
                self._deletes |= {cid for cid in deletes if cid not in self._pending}
                self._failed(rows, exc)
                return
            if rows:
                self.stats.batches += 1
                self.stats.records_written += len(rows) - too_large
            self.stats.evicted += evicted
            self.stats.expired += expired
            if too_large:
                self.stats.dropped += too_large
                self._warn.warning(logger, "%d completions larger than the store's cap were not stored", too_large)
            if self._problem is not None:
                logger.warning("sqlite store %s: writing again", self.path)
                self._problem = None

    def _failed(self, rows: dict[str, CompletionRecord], exc: sqlite3.Error) -> None:
        """Keep the rows for the next flush (newer queued writes of the same id win), bounded by ``max_pending``."""
        self.stats.write_errors += 1
        self._problem = f"sqlite store {self.path}: cannot write: {exc}"
        self._warn.warning(
            logger, "sqlite store %s: cannot write %d records (kept for the next try): %s", self.path, len(rows), exc
        )
        rows.update(self._pending)
        self._pending = rows
        excess = len(rows) - self.options.max_pending
        if excess > 0:
            for cid in list(rows)[:excess]:
                del rows[cid]
            self.stats.dropped += excess

    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._executor is None:
            raise StoreUnavailable(f"sqlite store {self.path} is closed")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _read(self, fn: Any, *args: Any) -> Any:
        try:
            return await self._run(fn, *args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"sqlite store {self.path}: {exc}") from exc

    # -- in the worker thread ----------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: no implicit transactions; each write opens its own BEGIN IMMEDIATE.
        conn = sqlite3.connect(self.path, timeout=self._busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise sqlite3.OperationalError(f"cannot use WAL journal mode here (got {mode})")
            conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at each checkpoint, no fsync per commit
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise sqlite3.DatabaseError(f"written by a newer server (schema {version}, this one reads {SCHEMA_VERSION})")
            conn.executescript("BEGIN IMMEDIATE;" + _SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;")
            info = InstanceInfo.here()
            now = time.time()
            conn.execute(
                "INSERT OR REPLACE INTO instances VALUES (?, ?, ?, ?, ?)", (self.instance_id, info.host, info.pid, now, now)
            )
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _write(
        self, records: list[CompletionRecord], deletes: set[str], heartbeat: bool, purge: bool
    ) -> tuple[int, int, int]:
        conn = self._conn
        assert conn is not None
        now = time.time()
        evicted = expired = 0
        cap = self.options.max_bytes
        rows: list[Row] = []
        for record in records:  # encoded here, off the event loop
            data = encode(record)
            if len(data) <= cap:
                rows.append((record.id, record.instance, record.status, now, record.expires_at, data))
        too_large = len(records) - len(rows)
        conn.execute("BEGIN IMMEDIATE")
        try:
            if rows:
                conn.executemany(_UPSERT, rows)
            if deletes:
                conn.executemany("DELETE FROM completions WHERE id = ?", [(cid,) for cid in deletes])
            if heartbeat:
                conn.execute("UPDATE instances SET heartbeat = ? WHERE id = ?", (now, self.instance_id))
            if purge:
                expired = conn.execute("DELETE FROM completions WHERE expires_at <= ?", (now,)).rowcount
                # instances that stopped beating a day ago own nothing that reads as alive
                conn.execute("DELETE FROM instances WHERE heartbeat < ?", (now - 86400,))
            if rows:
                evicted = self._evict(conn)
            conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        return evicted, expired, too_large

    def _evict(self, conn: sqlite3.Connection) -> int:
        """Over ``max_bytes``: delete the least recently written records until under it."""
        total = conn.execute("SELECT value FROM totals WHERE name = 'bytes'").fetchone()[0]
        excess = total - self.options.max_bytes
        if excess <= 0:
            return 0
        victims = []
        for cid, size in conn.execute("SELECT id, length(data) FROM completions ORDER BY written_at, rowid"):
            victims.append((cid,))
            excess -= size
            if excess <= 0:
                break
        conn.executemany("DELETE FROM completions WHERE id = ?", victims)
        return len(victims)

    def _select(self, completion_id: str) -> bytes | None:
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT data FROM completions WHERE id = ? AND expires_at > ?", (completion_id, time.time())
        ).fetchone()
        return None if row is None else bytes(row[0])

    def _delete_row(self, completion_id: str) -> int:
        assert self._conn is not None
        return self._conn.execute("DELETE FROM completions WHERE id = ?", (completion_id,)).rowcount

    def _instance_row(self, instance_id: str) -> tuple[str, int, float] | None:
        assert self._conn is not None
        return self._conn.execute("SELECT host, pid, heartbeat FROM instances WHERE id = ?", (instance_id,)).fetchone()

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            # gone on purpose: its records in flight were ended and flushed before (docs/store.md)
            conn.execute("DELETE FROM instances WHERE id = ?", (self.instance_id,))
        finally:
            conn.close()
