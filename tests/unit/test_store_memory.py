"""The memory back end (openai_stream_server/store/memory_store.py): round trip, TTL, cap."""

from __future__ import annotations

import asyncio

from openai_stream_server.store.base import StoreOptions
from openai_stream_server.store.memory_store import MemoryStore
from openai_stream_server.store.record import CompletionRecord


def finished(cid: str, text: str = "hello", stored: bool = False) -> CompletionRecord:
    return CompletionRecord(
        cid, "chat", "m", 1, status="completed", finish_reason="stop", pieces=[text], completion_tokens=1, stored=stored
    )


async def test_round_trip_sets_owner_and_expiry() -> None:
    store = MemoryStore(StoreOptions(completion_ttl_s=60, response_ttl_s=3600))
    store.put(finished("a"))
    store.put(finished("b", stored=True))
    a, b = await store.get("a"), await store.get("b")
    assert a is not None and b is not None
    assert a.pieces == ["hello"] and a.instance == store.instance_id
    assert 3000 < b.expires_at - a.expires_at < 3600  # stored responses live longer
    assert await store.get("nope") is None
    assert await store.delete("a") and not await store.delete("a")
    assert await store.get("a") is None


async def test_expired_records_read_as_missing_then_are_purged() -> None:
    store = MemoryStore(StoreOptions(completion_ttl_s=0.05))
    store.put(finished("a"))
    assert await store.get("a") is not None
    await asyncio.sleep(0.1)
    assert await store.get("a") is None
    assert len(store) == 1 and store.purge() == 1 and len(store) == 0 and store.nbytes == 0


async def test_the_cap_evicts_least_recently_written_first() -> None:
    probe = MemoryStore()
    probe.put(finished("r0", "x" * 100))
    size = probe.nbytes  # with the expiry and owner put() adds
    store = MemoryStore(StoreOptions(max_bytes=3 * size + 16))  # the expiry's digits vary by a byte or two
    for i in range(3):
        store.put(finished(f"r{i}", "x" * 100))
    store.put(finished("r0", "x" * 100))  # written again: now the newest
    store.put(finished("r3", "x" * 100))
    assert [await store.get(f"r{i}") is not None for i in range(4)] == [True, False, True, True]
    assert store.nbytes <= 3 * size + 16 and store.stats.evicted == 1


async def test_a_record_larger_than_the_cap_is_not_stored_and_counted() -> None:
    store = MemoryStore(StoreOptions(max_bytes=200))
    store.put(finished("small"))
    store.put(finished("huge", "x" * 1000))
    assert await store.get("huge") is None and await store.get("small") is not None
    assert store.stats.dropped == 1


async def test_an_in_flight_record_of_this_process_stays_in_flight() -> None:
    store = MemoryStore()
    store.put(CompletionRecord("a", "chat", "m", 1))
    record = await store.get("a")
    assert record is not None and record.status == "in_progress"


async def test_discard_forgets_at_once() -> None:
    store = MemoryStore()
    store.put(finished("a"))
    store.discard("a")
    store.discard("never-there")
    assert await store.get("a") is None and len(store) == 0 and store.nbytes == 0
