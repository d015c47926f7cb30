"""The Redis back end (openai_stream_server/store/redis_store.py) against a real redis-server.

Two ``RedisStore`` objects on one server stand for two server processes (each its own instance id,
client and connections). Round trip, TTL, the size cap, a live log tailed while it is written,
control messages over pub/sub, and Redis killed and started again on the same port.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from openai_stream_server.store.base import CANCEL, DELETE, LogBatch, StoreOptions, StoreUnavailable
from openai_stream_server.store.record import RESTARTED_MESSAGE, CompletionRecord
from openai_stream_server.store.redis_store import RedisStore
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.timeout(90)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


def finished(cid: str, text: str = "hello", stored: bool = False) -> CompletionRecord:
    return CompletionRecord(
        cid, "chat", "m", 1, status="completed", finish_reason="stop", pieces=[text], completion_tokens=1, stored=stored
    )


@pytest.fixture
async def stores(redis_server: RedisServer) -> AsyncIterator[tuple[RedisStore, RedisStore]]:
    """Process A's store and process B's, on one Redis."""
    a = RedisStore(redis_server.url, StoreOptions(), probe_interval_s=0.1)
    b = RedisStore(redis_server.url, StoreOptions(), probe_interval_s=0.1)
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def sync_client(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


async def eventually(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_a_record_written_by_one_process_is_read_by_another(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    record = finished("resp_1", stored=True)
    a.put(record)
    await a.flush()
    got = await b.get("resp_1")
    assert got == record and got.instance == a.instance_id
    assert await b.get("unknown") is None


async def test_records_expire_with_their_ttl(redis_server: RedisServer) -> None:
    store = RedisStore(redis_server.url, StoreOptions(completion_ttl_s=0.3))
    await store.start()
    try:
        store.put(finished("short"))
        store.put(finished("stored", stored=True))
        await store.flush()
        assert await store.get("short") is not None
        await asyncio.sleep(0.5)
        assert await store.get("short") is None and await store.get("stored") is not None
        store.put(finished("later"))  # each write also purges what expired from the totals
        await store.flush()
        assert store.stats.expired == 1
        r = sync_client(redis_server)
        assert set(r.hkeys("oss:sizes")) == {b"stored", b"later"}
        assert int(r.get("oss:bytes")) == sum(int(v) for v in r.hvals("oss:sizes"))
    finally:
        await store.aclose()


async def test_the_cap_evicts_least_recently_written_first(redis_server: RedisServer) -> None:
    probe = RedisStore(redis_server.url, prefix="probe:")
    await probe.start()
    probe.put(finished("r0", "x" * 200))
    await probe.flush()
    size = int(sync_client(redis_server).hget("probe:sizes", "r0"))
    await probe.aclose()

    store = RedisStore(redis_server.url, StoreOptions(max_bytes=3 * size + 16))
    await store.start()
    try:
        for i in range(3):
            store.put(finished(f"r{i}", "x" * 200))
            await store.flush()
        store.put(finished("r0", "x" * 200))  # written again: now the newest
        await store.flush()
        store.put(finished("r3", "x" * 200))
        await store.flush()
        assert [await store.get(f"r{i}") is not None for i in range(4)] == [True, False, True, True]
        assert store.stats.evicted == 1
        r = sync_client(redis_server)
        assert int(r.get("oss:bytes")) == sum(int(v) for v in r.hvals("oss:sizes")) <= 3 * size + 16
    finally:
        await store.aclose()


async def test_a_live_log_is_tailed_by_another_process_as_it_grows(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    a.put(CompletionRecord("chatcmpl-live", "chat", "m", 1))
    a.append("chatcmpl-live", LogBatch(0, ["a", "b"]))
    await a.flush()

    seen: list[LogBatch | CompletionRecord] = []

    async def follow(after: int) -> list[LogBatch | CompletionRecord]:
        out = []
        async for item in b.tail("chatcmpl-live", after):
            out.append(item)
        return out

    from_start = asyncio.create_task(follow(-1))
    from_one = asyncio.create_task(follow(0))
    await asyncio.sleep(0.1)
    a.append("chatcmpl-live", LogBatch(2, ["c"]))
    await asyncio.sleep(0.05)
    a.append("chatcmpl-live", LogBatch(3, ["d", "e"]))
    a.put(
        CompletionRecord("chatcmpl-live", "chat", "m", 1, status="completed", finish_reason="stop", pieces=list("abcde"))
    )
    seen = await asyncio.wait_for(from_start, 10)
    *batches, final = seen
    assert [p for batch in batches for p in batch.pieces] == list("abcde")  # type: ignore[union-attr]
    assert isinstance(final, CompletionRecord) and final.status == "completed"
    *batches, final = await asyncio.wait_for(from_one, 10)
    assert [p for batch in batches for p in batch.pieces] == list("bcde")  # type: ignore[union-attr]
    assert batches[0].start == 1  # type: ignore[union-attr]
    # one stream entry per delivered batch, plus the end entry
    entries = await a._client.xrange("oss:log:chatcmpl-live")
    assert len(entries) == 4


async def test_appends_queued_together_go_in_one_pipeline(stores: tuple[RedisStore, RedisStore]) -> None:
    a, _ = stores
    before = a.stats.batches
    for i in range(100):
        a.append(f"c{i % 10}", LogBatch(i // 10, [f"p{i}"]))
    await a.flush()
    assert a.stats.batches - before <= 2 and a.stats.log_batches >= 100


async def test_a_tail_of_a_completion_whose_process_died_ends_as_failed(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    dead = CompletionRecord("chatcmpl-orphan", "chat", "m", 1, instance="deadbeefdeadbeef")
    a.put(dead)
    a.append("chatcmpl-orphan", LogBatch(0, ["x"]))
    await a.flush()
    items = [item async for item in b.tail("chatcmpl-orphan")]
    assert isinstance(items[0], LogBatch) and items[0].pieces == ["x"]
    final = items[-1]
    assert isinstance(final, CompletionRecord) and final.status == "failed"
    assert final.error is not None and final.error.message == RESTARTED_MESSAGE


async def test_cancel_and_delete_reach_the_owner_over_pubsub(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    heard: list[tuple[str, str]] = []
    a.on_control(lambda op, cid: heard.append((op, cid)))
    await asyncio.sleep(0.2)  # the listener subscribes
    await b.send_control(a.instance_id, CANCEL, "chatcmpl-1")
    await eventually(lambda: heard == [(CANCEL, "chatcmpl-1")])

    a.put(finished("chatcmpl-2"))
    await a.flush()
    assert await b.delete("chatcmpl-2")
    await eventually(lambda: (DELETE, "chatcmpl-2") in heard)
    assert await a.get("chatcmpl-2") is None and not await b.delete("chatcmpl-2")


async def test_discard_goes_with_the_next_pipeline_and_tells_the_owner(stores: tuple[RedisStore, RedisStore]) -> None:
    a, b = stores
    heard: list[tuple[str, str]] = []
    a.on_control(lambda op, cid: heard.append((op, cid)))
    await asyncio.sleep(0.2)  # the listener subscribes
    a.put(finished("chatcmpl-3"))
    a.append("chatcmpl-3", LogBatch(0, ["hello"]))
    await a.flush()
    b.discard("chatcmpl-3")
    await eventually(lambda: (DELETE, "chatcmpl-3") in heard)
    assert await a.get("chatcmpl-3") is None
    assert await a._client.exists("oss:log:chatcmpl-3") == 0
    a.discard("chatcmpl-3")  # its own: nobody else to tell
    await a.flush()
    assert heard.count((DELETE, "chatcmpl-3")) == 1


async def test_an_instance_is_alive_until_it_closes(stores: tuple[RedisStore, RedisStore], redis_server: RedisServer) -> None:
    a, _ = stores
    c = RedisStore(redis_server.url)
    await c.start()
    assert await a.alive(c.instance_id)
    c.put(CompletionRecord("chatcmpl-open", "chat", "m", 1))
    await c.aclose()
    a._alive_cache.clear()
    assert not await a.alive(c.instance_id)
    record = await a.get("chatcmpl-open")
    assert record is not None and record.status == "failed"


async def test_redis_lost_fails_fast_reports_unhealthy_and_recovers(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    a = RedisStore(server.url, probe_interval_s=0.1)
    b = RedisStore(server.url, probe_interval_s=0.1)
    await a.start()
    await b.start()
    heard: list[tuple[str, str]] = []
    a.on_control(lambda op, cid: heard.append((op, cid)))
    try:
        a.put(finished("before"))
        await a.flush()
        server.kill()

        # fails at once rather than hang: wait_for turns a hang into a TimeoutError, which fails the test
        with pytest.raises(StoreUnavailable, match="redis at 127.0.0.1"):
            await asyncio.wait_for(b.get("before"), 5)
        with pytest.raises(StoreUnavailable):
            await asyncio.wait_for(b.send_control(a.instance_id, CANCEL, "x"), 5)
        problem = b.problem()
        assert problem is not None and f"127.0.0.1:{server.port}" in problem

        a.put(finished("during"))  # queued, not raised
        a.append("during", LogBatch(0, ["x"]))
        await eventually(lambda: a.problem() is not None)

        server.start()  # the same port, empty (it saved nothing)
        await eventually(lambda: a.problem() is None and b.problem() is None)
        await eventually(lambda: a.stats.records_written >= 2)
        got = await b.get("during")
        assert got is not None and got.pieces == ["hello"]
        await asyncio.sleep(0.3)  # the listener subscribes again
        await b.send_control(a.instance_id, CANCEL, "after")
        await eventually(lambda: (CANCEL, "after") in heard)
        assert await b.alive(a.instance_id)  # the heartbeat is back too
    finally:
        await a.aclose()
        await b.aclose()
        server.kill()
