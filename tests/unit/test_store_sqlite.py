"""The SQLite back end (openai_stream_server/store/sqlite_store.py) on real files.

Round trip across a reopen, TTL, the size cap, two stores on one file at once, batching, a
process that dies with a completion in flight, and a full or locked database.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import sys
import textwrap
from pathlib import Path

import pytest

from openai_stream_protocol import Part, ToolCallDelta
from openai_stream_server.store.base import StoreOptions
from openai_stream_server.store.record import RESTARTED_MESSAGE, CompletionRecord, RecordError
from openai_stream_server.store.sqlite_store import SqliteStore

pytestmark = pytest.mark.timeout(60)


def finished(cid: str, text: str = "hello", stored: bool = False) -> CompletionRecord:
    return CompletionRecord(
        cid, "chat", "m", 1, status="completed", finish_reason="stop", pieces=[text], completion_tokens=1, stored=stored
    )


async def opened(path: Path, options: StoreOptions | None = None, **kwargs: object) -> SqliteStore:
    store = SqliteStore(path, options or StoreOptions(flush_interval_s=0.05), **kwargs)  # type: ignore[arg-type]
    await store.start()
    return store


def rows(path: Path) -> dict[str, str]:
    """What the file holds, read by a connection of the test's own: id -> status."""
    with sqlite3.connect(path) as conn:
        return dict(conn.execute("SELECT id, status FROM completions"))


async def eventually(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_record_survives_closing_and_reopening(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    record = CompletionRecord(
        "resp_1",
        "responses",
        "m",
        7,
        status="failed",
        finish_reason="error",
        error=RecordError("boom", "server_error", "x", None),
        pieces=["a", "{\"k\":1}"],
        tool_calls={1: ToolCallDelta(0, "call_1", "f")},
        parts=[Part("user", "text", "hi")],
        context={"instructions": "be brief"},
        stored=True,
    )
    store = await opened(path)
    store.put(record)
    await store.aclose()  # a graceful stop flushes
    again = await opened(path)
    try:
        assert await again.get("resp_1") == record
        assert await again.delete("resp_1") and await again.get("resp_1") is None
    finally:
        await again.aclose()


async def test_put_only_queues_and_the_flusher_writes_within_its_interval(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=0.2))
    try:
        store.put(finished("a"))
        assert rows(path) == {}  # nothing written on the caller's side
        assert (await store.get("a")) is not None  # but readable from the queue
        await eventually(lambda: rows(path) == {"a": "completed"})
    finally:
        await store.aclose()


async def test_many_records_are_written_in_few_transactions(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=0.5, max_batch=10_000))
    statements: list[str] = []
    await store._run(lambda: store._conn.set_trace_callback(statements.append))  # type: ignore[union-attr]
    try:
        for i in range(1000):
            store.put(CompletionRecord(f"c{i}", "chat", "m", 1))  # the opened record...
            store.put(finished(f"c{i}"))  # ...and the final one in the same interval: written once
        await store.flush()
        transactions = [s for s in statements if s.startswith("BEGIN")]
        assert len(transactions) <= 2
        assert store.stats.records_written == 1000
        assert len(rows(path)) == 1000 and set(rows(path).values()) == {"completed"}
    finally:
        await store.aclose()


async def test_expired_records_read_as_missing_and_are_purged(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=0.05, completion_ttl_s=0.2, purge_interval_s=0.1))
    try:
        store.put(finished("short"))
        store.put(finished("stored", stored=True))  # the 30-day TTL
        await store.flush()
        assert await store.get("short") is not None
        await asyncio.sleep(0.3)
        assert await store.get("short") is None
        assert await store.get("stored") is not None
        await eventually(lambda: set(rows(path)) == {"stored"})
        assert store.stats.expired == 1
    finally:
        await store.aclose()


async def test_the_cap_evicts_least_recently_written_first(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    probe = await opened(tmp_path / "probe.db")
    probe.put(finished("r0", "x" * 200))
    await probe.flush()
    with sqlite3.connect(tmp_path / "probe.db") as conn:
        size = conn.execute("SELECT length(data) FROM completions").fetchone()[0]
    await probe.aclose()

    store = await opened(path, StoreOptions(flush_interval_s=0.05, max_bytes=3 * size + 16))
    try:
        for i in range(3):
            store.put(finished(f"r{i}", "x" * 200))
            await store.flush()
        store.put(finished("r0", "x" * 200))  # written again: now the newest
        await store.flush()
        store.put(finished("r3", "x" * 200))
        await store.flush()
        assert sorted(rows(path)) == ["r0", "r2", "r3"]
        assert store.stats.evicted == 1
        with sqlite3.connect(path) as conn:  # the running total the triggers keep is exact
            total = conn.execute("SELECT value FROM totals WHERE name = 'bytes'").fetchone()[0]
            assert total == conn.execute("SELECT sum(length(data)) FROM completions").fetchone()[0]
    finally:
        await store.aclose()


async def test_two_stores_share_one_file_at_once(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a = await opened(path)
    b = await opened(path)
    try:

        async def write(store: SqliteStore, prefix: str) -> None:
            for i in range(200):
                store.put(finished(f"{prefix}{i}"))
                if i % 20 == 0:
                    await store.flush()
            await store.flush()

        await asyncio.gather(write(a, "a"), write(b, "b"))
        assert len(rows(path)) == 400
        assert (await a.get("b7")) is not None and (await b.get("a7")) is not None
        assert a.stats.write_errors == b.stats.write_errors == 0
        with sqlite3.connect(path) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        # an in-flight record of a live instance stays in flight for the other
        a.put(CompletionRecord("live", "chat", "m", 1))
        await a.flush()
        live = await b.get("live")
        assert live is not None and live.status == "in_progress" and await b.alive(a.instance_id)
    finally:
        await a.aclose()
        await b.aclose()


CRASH = textwrap.dedent(
    """
    import asyncio, os, sys
    from openai_stream_server.store.base import StoreOptions
    from openai_stream_server.store.record import CompletionRecord
    from openai_stream_server.store.sqlite_store import SqliteStore

    async def main():
        store = SqliteStore(sys.argv[1], StoreOptions(flush_interval_s=0.05))
        await store.start()
        store.put(CompletionRecord("inflight", "chat", "m", 1))
        await store.flush()
        print(store.instance_id, flush=True)
        os._exit(1)  # dies without closing, as a killed server does

    asyncio.run(main())
    """
)


async def test_a_record_left_in_flight_by_a_dead_process_reads_failed(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH, str(path), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await asyncio.wait_for(process.communicate(), 30)
    dead_instance = out.decode().strip()
    assert process.returncode == 1 and dead_instance, err.decode()
    assert rows(path) == {"inflight": "in_progress"}
    store = await opened(path)
    try:
        assert not await store.alive(dead_instance)
        record = await store.get("inflight")
        assert record is not None
        assert (record.status, record.finish_reason) == ("failed", "error")
        assert record.error is not None and record.error.message == RESTARTED_MESSAGE
    finally:
        await store.aclose()


async def test_a_gracefully_closed_instance_is_not_alive(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a = await opened(path)
    b = await opened(path)
    try:
        assert await b.alive(a.instance_id)
        await a.aclose()
        b._alive_cache.clear()
        assert not await b.alive(a.instance_id)
    finally:
        await b.aclose()


async def test_a_full_disk_is_counted_logged_once_and_retried(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=0.02))
    caplog.set_level(logging.WARNING, logger="openai_stream_server.store.sqlite_store")

    def fill_up() -> None:
        assert store._conn is not None
        pages = store._conn.execute("PRAGMA page_count").fetchone()[0]
        store._conn.execute(f"PRAGMA max_page_count = {pages}")  # SQLITE_FULL on the next page

    def make_room() -> None:
        assert store._conn is not None
        store._conn.execute("PRAGMA max_page_count = 1073741823")

    try:
        await store._run(fill_up)
        for i in range(50):
            store.put(finished(f"big{i}", "x" * 4000))
        await eventually(lambda: store.stats.write_errors >= 3)  # the flusher keeps trying, every interval
        problem = store.problem()
        assert problem is not None and "full" in problem
        full_reports = [r for r in caplog.records if "cannot write" in r.getMessage()]
        assert len(full_reports) == 1  # at most once a minute
        assert (await store.get("big0")) is not None  # still queued, still readable
        await store._run(make_room)
        await eventually(lambda: store.problem() is None)
        assert len(rows(path)) == 50
    finally:
        await store.aclose()


async def test_a_locked_database_is_counted_and_written_once_free(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=0.02), busy_timeout_ms=50)
    blocker = sqlite3.connect(path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")  # another program holding the write lock
        store.put(finished("a"))
        await eventually(lambda: store.stats.write_errors >= 1)
        problem = store.problem()
        assert problem is not None and "locked" in problem
        blocker.execute("COMMIT")
        await eventually(lambda: store.problem() is None)
        assert rows(path) == {"a": "completed"}
    finally:
        blocker.close()
        await store.aclose()


async def test_discard_deletes_with_the_next_flush_and_drops_a_queued_write(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=10))
    try:
        store.put(finished("written"))
        await store.flush()
        store.put(finished("queued"))
        store.discard("written")
        store.discard("queued")
        assert await store.get("queued") is None
        assert rows(path) == {"written": "completed"}  # nothing done on the caller's side
        await store.flush()
        assert rows(path) == {}
        store.discard("again")
        store.put(finished("again"))  # a write after the discard wins
        await store.flush()
        assert rows(path) == {"again": "completed"}
    finally:
        await store.aclose()


async def test_a_discarded_record_reads_as_missing_before_the_flush(tmp_path: Path) -> None:
    store = await opened(tmp_path / "s.db", StoreOptions(flush_interval_s=10))
    try:
        store.put(finished("a"))
        await store.flush()
        store.discard("a")
        assert await store.get("a") is None
    finally:
        await store.aclose()


async def test_a_record_larger_than_the_cap_is_not_stored_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    store = await opened(path, StoreOptions(flush_interval_s=10, max_bytes=500))
    try:
        store.put(finished("small"))
        store.put(finished("huge", "x" * 1000))
        await store.flush()
        assert rows(path) == {"small": "completed"}
        assert store.stats.dropped == 1 and store.stats.records_written == 1
    finally:
        await store.aclose()
