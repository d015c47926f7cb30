"""The registry's side of the store (openai_stream_server/store/keeper.py) on real back ends.

Two keepers on one Redis stand for two server processes: A runs a completion (its states fed by
chunks, as the registry feeds them), B looks it up, follows it live, cancels it, reads it back.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from openai_stream_protocol import Chunk, Part
from openai_stream_server.errors import UpstreamError
from openai_stream_server.state import Status, StreamState
from openai_stream_server.store.base import StoreOptions
from openai_stream_server.store.keeper import InFlightElsewhere, RecordKeeper, SharedStoreUnavailable
from openai_stream_server.store.redis_store import RedisStore
from openai_stream_server.store.sqlite_store import SqliteStore
from tests.redis_server import RedisServer, running_redis

pytestmark = pytest.mark.timeout(60)


class Context:
    """A surface's context with a ``store`` flag, as the Responses API keeps one."""

    def __init__(self, store: bool) -> None:
        self.store = store


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    with running_redis(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def keepers(redis_server: RedisServer) -> AsyncIterator[tuple[RecordKeeper, RecordKeeper]]:
    a = RecordKeeper(RedisStore(redis_server.url, probe_interval_s=0.1))
    b = RecordKeeper(RedisStore(redis_server.url, probe_interval_s=0.1))
    await a.start()
    await b.start()
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


def opened(request_id: str = "chatcmpl-1", surface: str = "chat") -> StreamState:
    state = StreamState(request_id, "m", surface)
    state.keep_parts([Part("user", "text", "hi")])
    return state


def feed(keeper: RecordKeeper, state: StreamState, texts: list[str], fin: bool = False) -> None:
    """What ``registry.deliver`` does with one batch: accept the chunks, hand the new pieces to the keeper."""
    start = len(state.log.pieces)
    for i, text in enumerate(texts):
        last = fin and i == len(texts) - 1
        state.accept(Chunk(state.request_id, start + i, text, fin=last, finish_reason="stop" if last else None), 0.0)
    keeper.delivered({state: start})
    if state.done:
        keeper.ended(state)


async def eventually(check, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    for _ in range(int(timeout_s / 0.02)):
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not met in time")


async def test_b_follows_a_live_completion_of_a_to_its_end(keepers: tuple[RecordKeeper, RecordKeeper]) -> None:
    a, b = keepers
    state = opened()
    a.opened(state)
    feed(a, state, ["Hel", "lo"])
    await a.store.flush()
    mirror = await b.lookup("chatcmpl-1")
    assert mirror is not None and mirror.status is Status.IN_PROGRESS
    assert mirror.surface_data.parts == [Part("user", "text", "hi")]
    assert await b.lookup("chatcmpl-1") is mirror  # one mirror, however many readers
    await eventually(lambda: mirror.log.pieces == ["Hel", "lo"])
    feed(a, state, [" world", ""], fin=True)
    await asyncio.wait_for(mirror.wait_done(), 5)
    assert mirror.log.pieces == ["Hel", "lo", " world", ""] and mirror.status is Status.COMPLETED
    assert mirror.log.text == "Hello world"
    again = await b.lookup("chatcmpl-1")  # ended: read back from the record now
    assert again is not mirror and again is not None and again.log.pieces == mirror.log.pieces


async def test_a_cancel_on_b_reaches_a(keepers: tuple[RecordKeeper, RecordKeeper]) -> None:
    a, b = keepers
    state = opened("chatcmpl-2")

    def cancel(request_id: str) -> bool:  # the registry's cancel, on A
        assert request_id == state.request_id
        ok = state.cancel()
        a.ended(state)
        return ok

    a.attach(cancel, lambda _: False)
    await asyncio.sleep(0.2)  # A's control channel is subscribed
    a.opened(state)
    feed(a, state, ["x"])
    await a.store.flush()
    mirror = await b.lookup("chatcmpl-2")
    assert mirror is not None
    assert await b.cancel_elsewhere("chatcmpl-2")
    assert state.status is Status.CANCELLED and mirror.status is Status.CANCELLED


async def test_store_false_responses_are_not_written(keepers: tuple[RecordKeeper, RecordKeeper]) -> None:
    a, b = keepers
    kept, dropped = opened("resp_1", "responses"), opened("resp_2", "responses")
    kept.surface_data.context, dropped.surface_data.context = Context(store=True), Context(store=False)
    for state in (kept, dropped):
        a.opened(state)
        feed(a, state, ["ok"], fin=True)
    await a.store.flush()
    record = await a.store.get("resp_1")
    assert record is not None and record.stored
    assert await a.store.get("resp_2") is None


async def test_a_lost_store_is_a_503_for_what_only_it_holds(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "redis")
    server.start()
    keeper = RecordKeeper(RedisStore(server.url, probe_interval_s=0.1))
    await keeper.start()
    try:
        server.kill()
        with pytest.raises(SharedStoreUnavailable) as info:
            await asyncio.wait_for(keeper.lookup("chatcmpl-9"), 5)
        assert info.value.status == 503 and "redis at 127.0.0.1" in info.value.message
        await eventually(lambda: not keeper.health()["ok"])
        assert f"127.0.0.1:{server.port}" in keeper.health()["problem"]
    finally:
        await keeper.aclose()
        server.kill()


async def test_sqlite_reads_back_ended_ones_and_refuses_to_follow_live_ones(tmp_path: Path) -> None:
    path = tmp_path / "s.db"
    a = RecordKeeper(SqliteStore(path, StoreOptions(flush_interval_s=0.05)))
    b = RecordKeeper(SqliteStore(path, StoreOptions(flush_interval_s=0.05)))
    await a.start()
    await b.start()
    try:
        live, failed = opened("chatcmpl-live"), opened("chatcmpl-failed")
        for state in (live, failed):
            a.opened(state)
        feed(a, failed, ["partial"])
        failed.fail(UpstreamError("node died"))
        a.ended(failed)
        await a.store.flush()
        with pytest.raises(InFlightElsewhere):
            await b.lookup("chatcmpl-live")
        back = await b.lookup("chatcmpl-failed")
        assert back is not None and back.status is Status.FAILED and back.log.pieces == ["partial"]
        assert back.error is not None and back.error.message == "node died" and back.error.status == 500
        assert await b.lookup("chatcmpl-unknown") is None
    finally:
        await a.aclose()
        await b.aclose()
