"""Large legal bodies: judged by size before they are parsed, prepared off the event loop, and counted while held.

- A body whose size would take what the server holds past the admission share of
  ``--max-total-bytes`` is refused (503 + ``Retry-After``) before it is parsed: an invalid body
  gets the 503, not the 400 parsing would give. ``/v1/messages/count_tokens`` too.
- Bodies being read count against ``--max-active-requests`` with the requests in flight.
- A 6.6 MB body of 200,000 one-word messages (under the 8 MB limit) is parsed, validated and
  turned into parts off the loop: the loop's longest stall while it is posted is a small share
  of the time the post takes (on the loop it was all of it). Chat and count_tokens.
- What is held is counted in encoded bytes: a stored response's tools (held as Python objects
  they took ~9 times their JSON), the prompt a request keeps while in flight, and a body
  waiting for a live replica (docs/architecture.md, "Memory bounds", "Admission").
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Iterator
from typing import Any, TypeVar

import httpx
import pytest

from openai_stream_server.registry import StreamRegistry
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(120)

T = TypeVar("T")

JSON = {"content-type": "application/json"}
ASK = [{"role": "user", "content": "hi"}]
WORDS = 200_000
"""One-word messages in the large body: ~6.6 MB, under the 8 MB default limit."""


def _registry(client: httpx.AsyncClient) -> StreamRegistry:
    return client.app.state.registry  # type: ignore[attr-defined, no-any-return]


def _words_body(**fields: Any) -> bytes:
    return json.dumps({"model": "m", **fields, "messages": [{"role": "user", "content": "w"}] * WORDS}).encode()


async def longest_stall(work: Awaitable[T]) -> tuple[T, float, float]:
    """``work``'s result, the longest the loop went without running a 1 ms ticker meanwhile, and how long it took."""
    stalls: list[float] = []
    done = False

    async def tick() -> None:
        while not done:
            started = time.perf_counter()
            await asyncio.sleep(0.001)
            stalls.append(time.perf_counter() - started)

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    try:
        result = await work
    finally:
        took = time.perf_counter() - started
        done = True
        await ticker
    return result, max(stalls), took


# -- admission before parsing ------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/messages/count_tokens", "/v1/responses"])
async def test_a_body_that_would_pass_the_memory_bound_is_refused_before_it_is_parsed(path: str) -> None:
    # Bound 1,000,000: new work is refused once 750,000 would be held. Not JSON at all: parsed, it would get 400.
    async with make_client(Settings(sweep_interval_s=0.02, max_total_bytes=1_000_000)) as (client, _):
        r = await client.post(path, content=b"x" * 800_000, headers=JSON)
        assert r.status_code == 503, r.text
        assert r.headers["retry-after"] == "1"
        assert _registry(client).held_bytes == 0  # nothing left counted
        small = await client.post(path, content=b"x" * 1_000, headers=JSON)
        assert small.status_code == 400  # the same body, small enough, is read and parsed


async def test_bodies_being_read_count_against_the_in_flight_cap() -> None:
    settings = Settings(sweep_interval_s=0.02, max_active_requests=2)
    async with make_client(settings, FakeBackend(silent=True)) as (client, _):
        first = await client.post("/v1/chat/completions", json={"messages": ASK, "background": True})
        assert first.status_code == 202
        reading, rest_sent = asyncio.Event(), asyncio.Event()
        body = json.dumps({"messages": ASK, "background": True}).encode()

        async def slowly() -> AsyncIterator[bytes]:
            yield body[:10]
            reading.set()  # asked for more: the app has begun reading this body
            await rest_sent.wait()
            yield body[10:]

        slow = asyncio.ensure_future(client.post("/v1/chat/completions", content=slowly(), headers=JSON))
        await asyncio.wait_for(reading.wait(), 10)
        refused = await client.post("/v1/chat/completions", json={"messages": ASK, "background": True})
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "1"
        rest_sent.set()
        assert (await slow).status_code == 202  # the one being read was admitted first


# -- large bodies off the loop -----------------------------------------------------------------


@pytest.fixture
def server_gc() -> Iterator[None]:
    """The cyclic collector tuned as ``main()`` tunes it for the server (the young generation every 20,000 allocations):
    with the default (700) parsing 200,000 messages spends half its time, and its longest stalls, collecting."""
    before = gc.get_threshold()
    gc.set_threshold(20_000, 50, 100)
    yield
    gc.set_threshold(*before)


@pytest.mark.parametrize(
    "path, fields, answer",
    [
        pytest.param("/v1/chat/completions", {"background": True}, lambda r: r.status_code == 202, id="chat"),
        pytest.param("/v1/messages/count_tokens", {}, lambda r: r.json() == {"input_tokens": WORDS}, id="count_tokens"),
    ],
)
async def test_a_large_legal_body_is_prepared_off_the_loop(
    path: str, fields: dict[str, Any], answer: Any, server_gc: None
) -> None:
    """The longest stall is a small share of the post: 5-15 % here (the JSON decode alone holds the GIL for ~60 ms, and
    collections of the worker's young objects stop both threads), all of it when the body was prepared on the loop."""
    body = _words_body(**fields)
    assert len(body) < 8 * 1024 * 1024
    async with make_client(Settings(sweep_interval_s=0.02), FakeBackend(silent=True)) as (client, _):
        client.timeout = httpx.Timeout(120)
        r, stall, took = await longest_stall(client.post(path, content=body, headers=JSON))
    assert r.status_code == 200 or r.status_code == 202, r.text[:300]
    assert answer(r)
    assert stall < took / 3, f"the loop stalled {stall * 1000:.0f} ms of the {took * 1000:.0f} ms the post took"


# -- what is held is counted ------------------------------------------------------------------


def _tools(size: int) -> list[dict[str, Any]]:
    """Function tools whose JSON is about ``size`` bytes: many properties with descriptions (a schema-heavy agent)."""
    count = size // 20_000 + 1
    return [
        {
            "type": "function",
            "name": f"tool_{i}",
            "parameters": {
                "type": "object",
                "properties": {f"p{j}": {"type": "string", "description": f"the {j}th field"} for j in range(400)},
            },
        }
        for i in range(count)
    ]


async def test_stored_responses_count_their_tools_and_hold_about_what_they_count() -> None:
    """Three stored responses with ~2 MB of tools each: the held bytes grow by at least their JSON, and the Python memory
    that stays per counted byte is close to 1 (the tools held as parsed objects took ~9 per byte, uncounted)."""
    tools = _tools(2_000_000)
    tools_bytes = len(json.dumps(tools))
    body = {"model": "m", "input": "hi", "store": True, "tools": tools}
    async with make_client(Settings(sweep_interval_s=0.02)) as (client, backend):
        client.timeout = httpx.Timeout(60)
        registry = _registry(client)
        warm = await client.post("/v1/responses", json=body)  # first-use allocations (caches, pools) out of the figure
        assert warm.status_code == 200
        backend.submitted.clear()  # the fake keeps what it was sent; the server does not
        gc.collect()
        tracemalloc.start()
        try:
            held_before, (traced_before, _) = registry.held_bytes, tracemalloc.get_traced_memory()
            for _ in range(3):
                r = await client.post("/v1/responses", json=body)
                assert r.status_code == 200 and len(r.json()["tools"]) == len(tools)
                backend.submitted.clear()
            gc.collect()
            held, (traced, _) = registry.held_bytes - held_before, tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        stored = (await client.get(f"/v1/responses/{r.json()['id']}")).json()
    assert stored["tools"] == r.json()["tools"]  # kept whole, read back the same
    assert held >= 3 * tools_bytes, f"3 responses with {tools_bytes} bytes of tools each moved held_bytes by {held}"
    per_counted = (traced - traced_before) / held
    assert per_counted < 3, f"{per_counted:.1f} bytes of Python memory stay per counted byte"


async def test_the_prompt_a_request_keeps_while_in_flight_is_counted() -> None:
    prompt = "word " * 200_000  # 1 MB
    async with make_client(Settings(sweep_interval_s=0.02), FakeBackend(silent=True)) as (client, _):
        registry = _registry(client)
        r = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": prompt}], "background": True}
        )
        assert r.status_code == 202
        assert registry.held_bytes >= len(prompt)
        await client.post(f"/v1/chat/completions/{r.json()['id']}/cancel")
        assert registry.held_bytes < 10_000  # ended: only its (empty) answer is retained


class _NoReplicaYet(FakeBackend):
    """No replica is live until ``live`` is set: requests wait in ``wait_live`` (a replica restarting)."""

    def __init__(self) -> None:
        super().__init__(silent=True)
        self.live = asyncio.Event()
        self.waiting = 0

    async def wait_live(self, timeout_s: float) -> bool:
        self.waiting += 1
        try:
            await asyncio.wait_for(self.live.wait(), timeout_s)
        except TimeoutError:
            return False
        finally:
            self.waiting -= 1
        return True


async def test_a_body_waiting_for_a_live_replica_is_counted_and_bounds_the_next() -> None:
    prompt = "word " * 200_000  # 1 MB
    body = {"messages": [{"role": "user", "content": prompt}], "background": True}
    backend = _NoReplicaYet()
    async with make_client(Settings(sweep_interval_s=0.02, max_total_bytes=2_000_000), backend) as (client, _):
        registry = _registry(client)
        waiting = asyncio.ensure_future(client.post("/v1/chat/completions", json=body))
        for _ in range(2000):  # bounded: it reaches wait_live within a few loop turns (the body is parsed off the loop)
            if backend.waiting:
                break
            await asyncio.sleep(0.005)
        assert backend.waiting == 1
        assert registry.held_bytes >= len(prompt)  # its body, though no completion is open yet
        refused = await client.post("/v1/chat/completions", json=body)  # 2 MB would pass 1.5 MB: refused before parsing
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_overloaded"
        backend.live.set()
        assert (await waiting).status_code == 202
