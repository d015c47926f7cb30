"""Finished completions stay for ``retention_s``, at most ``max_retained`` of them and ``max_retained_bytes`` of text,
oldest evicted first; after eviction GET and reattach answer 404 (docs/architecture.md, Limits and failure behaviour)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from openai_stream_server.registry import StreamRegistry
from openai_stream_server.settings import Settings
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(60)


async def complete(client: httpx.AsyncClient, text: str) -> str:
    r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == text
    return str(r.json()["id"])


async def status_of(client: httpx.AsyncClient, request_id: str) -> int:
    by_id = (await client.get(f"/v1/chat/completions/{request_id}")).status_code
    stream = (await client.get(f"/v1/chat/completions/{request_id}/stream", headers={"Last-Event-ID": "0"})).status_code
    assert by_id == stream
    return by_id


def registry_of(client: httpx.AsyncClient) -> StreamRegistry:
    registry = client.app.state.registry  # type: ignore[attr-defined]
    assert isinstance(registry, StreamRegistry)
    return registry


async def test_retained_until_retention_s_then_404() -> None:
    """Deterministic: age the completion by moving its end time back, then sweep."""
    async with make_client(Settings(sweep_interval_s=3600, retention_s=300)) as (client, _):
        first, second = await complete(client, "one two"), await complete(client, "three")
        registry = registry_of(client)
        registry.sweep()
        assert await status_of(client, first) == 200 and await status_of(client, second) == 200
        state = registry.get(first)
        assert state is not None and state.ended_at is not None
        state.ended_at -= 301
        registry.sweep()
        assert await status_of(client, first) == 404
        assert await status_of(client, second) == 200
        error = (await client.get(f"/v1/chat/completions/{first}")).json()["error"]
        assert error["code"] == "not_found"


async def test_the_sweeper_expires_completions_by_itself() -> None:
    async with make_client(Settings(sweep_interval_s=0.01, retention_s=0.05)) as (client, _):
        request_id = await complete(client, "short lived")
        for _ in range(500):  # bounded: 5 s at most
            if (await client.get(f"/v1/chat/completions/{request_id}")).status_code == 404:
                break
            await asyncio.sleep(0.01)
        assert await status_of(client, request_id) == 404
        assert len(registry_of(client).retained) == 0


async def test_count_bound_evicts_oldest_first() -> None:
    async with make_client(Settings(sweep_interval_s=0.02, max_retained=3)) as (client, _):
        ids = [await complete(client, f"answer {i}") for i in range(6)]
        assert [await status_of(client, i) for i in ids] == [404, 404, 404, 200, 200, 200]
        assert list(registry_of(client).retained) == ids[3:]


async def test_byte_bound_evicts_oldest_first() -> None:
    async with make_client(Settings(sweep_interval_s=0.02, max_retained_bytes=100)) as (client, _):
        texts = ["a" * 30, "b" * 30, "c" * 30, "d" * 30, "e" * 50, "f" * 10]
        ids = [await complete(client, t) for t in texts]
        registry = registry_of(client)
        # Model: after each completion, drop the oldest while the total exceeds the bound.
        kept: list[int] = []
        for i in range(len(texts)):
            kept.append(i)
            while sum(len(texts[k]) for k in kept) > 100:
                kept.pop(0)
        assert kept == [3, 4, 5]
        assert [await status_of(client, ids[i]) for i in range(len(ids))] == [200 if i in kept else 404 for i in range(len(ids))]
        assert sum(s.log.nbytes for s in registry.retained.values()) <= 100


async def test_a_completion_larger_than_the_byte_bound_is_not_retained() -> None:
    async with make_client(Settings(sweep_interval_s=0.02, max_retained_bytes=10)) as (client, _):
        small = await complete(client, "tiny")
        big = await complete(client, "x" * 11)
        assert await status_of(client, big) == 404
        assert await status_of(client, small) == 404  # evicted before the big one, oldest first


async def test_memory_does_not_grow_with_finished_requests() -> None:
    settings = Settings(sweep_interval_s=0.02, max_retained=5, max_retained_bytes=1000)
    async with make_client(settings) as (client, _):
        registry = registry_of(client)
        for batch in range(4):
            await asyncio.gather(*(complete(client, f"batch {batch} request {i} " + "z" * 40) for i in range(25)))
            assert len(registry.retained) <= 5
            assert sum(s.log.nbytes for s in registry.retained.values()) <= 1000
            assert registry.active == {}
        metrics = (await client.get("/metrics")).text
    assert "\noss_active_streams 0.0\n" in metrics
