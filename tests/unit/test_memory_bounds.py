"""Memory bounds: bytes per completion, bytes over all completions, and no cancel for what never went out.

Per completion, ``max_completion_bytes`` counts text plus a per-chunk overhead, for chunks in the log
and chunks held back for reordering, so empty chunks and ``seq`` far ahead end the request. Over all
completions, ``max_total_bytes``: retained ones evicted oldest first, new requests refused with 503 and
``Retry-After``, and past the bound the largest in flight fails.
"""

from __future__ import annotations

import random
import time

import httpx
import pytest

from openai_stream_protocol import Chunk, Part
from openai_stream_server.encoded_size import request_nbytes
from openai_stream_server.errors import UpstreamError
from openai_stream_server.registry import StreamRegistry
from openai_stream_server.settings import Settings
from openai_stream_server.state import (
    HELD_CHUNK_OVERHEAD_BYTES,
    LOGGED_CHUNK_OVERHEAD_BYTES,
    ByteLedger,
    Limits,
    Outcome,
    Status,
    StreamState,
)
from tests.fakes import FakeBackend
from tests.live import metric
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(30)

MSG = [{"role": "user", "content": "hi"}]


# -- per completion ------------------------------------------------------------------


def test_a_flood_of_empty_chunks_ends_the_request() -> None:
    allowed = 100
    state = StreamState("r", "m", "chat", limits=Limits(max_completion_bytes=allowed * LOGGED_CHUNK_OVERHEAD_BYTES))
    outcomes = [state.accept(Chunk("r", seq, ""), 0.0) for seq in range(allowed)]
    assert outcomes == [Outcome.DELIVERED] * allowed and not state.done
    assert state.accept(Chunk("r", allowed, ""), 0.0) is Outcome.DELIVERED
    assert state.status is Status.FAILED
    assert isinstance(state.error, UpstreamError) and state.error.code == "completion_too_large"
    assert state.log.nbytes == 0  # no text at all: the overhead alone reached the limit
    assert state.accept(Chunk("r", allowed + 1, ""), 0.0) is Outcome.LATE  # nothing more is kept
    assert len(state.log.pieces) == allowed + 1


def test_chunks_held_for_reordering_count_towards_the_limit() -> None:
    """``seq`` 1, 2, ... without 0: each is held; their bytes end the request long before ``max_buffered_chunks``."""
    per_chunk = 1000 + HELD_CHUNK_OVERHEAD_BYTES
    state = StreamState("r", "m", "chat", limits=Limits(max_buffered_chunks=4096, max_completion_bytes=10 * per_chunk))
    outcomes = [state.accept(Chunk("r", seq, "x" * 1000), 0.0) for seq in range(1, 12)]
    assert outcomes == [Outcome.REORDERED] * 10 + [Outcome.OVERFLOW]
    assert state.status is Status.FAILED and state.error is not None and state.error.code == "completion_too_large"
    assert state.held_bytes == 0  # the held chunks were let go, and so were their bytes


def test_utf8_text_and_overhead_are_both_counted() -> None:
    rocket = "🚀" * 10  # 40 bytes, 10 characters
    state = StreamState("r", "m", "chat", limits=Limits(max_completion_bytes=40 + LOGGED_CHUNK_OVERHEAD_BYTES))
    state.accept(Chunk("r", 0, rocket), 0.0)
    assert (state.log.nbytes, state.held_bytes, state.done) == (40, 40 + LOGGED_CHUNK_OVERHEAD_BYTES, False)
    state.accept(Chunk("r", 1, ""), 0.0)
    assert state.status is Status.FAILED


@pytest.mark.parametrize("seed", range(8))
def test_the_shared_ledger_always_equals_what_the_completions_hold(seed: int) -> None:
    """Shuffled, duplicated, unicode, failed and cancelled chunks, kept conversations: the ledger never drifts
    (it is never rescanned), and each completion's bytes are its parts' own counts summed."""
    rng = random.Random(seed)
    ledger = ByteLedger()
    limits = Limits(max_buffered_chunks=rng.choice([4, 64]), max_completion_bytes=rng.choice([2_000, 50_000]))
    states = [StreamState(f"r{i}", "m", "chat", limits=limits, ledger=ledger) for i in range(6)]
    for _ in range(600):
        state = rng.choice(states)
        roll = rng.random()
        if roll < 0.01:
            state.cancel()
        elif roll < 0.02:
            state.fail(UpstreamError("boom"))
        elif roll < 0.03:  # the conversation kept for a continuation (Responses), once or again
            state.keep_parts([Part("user", "text", rng.choice(["", "é", "hello " * rng.randrange(5)]))])
        else:
            seq = rng.randrange(0, 40)
            state.accept(Chunk(state.request_id, seq, rng.choice(["", "a", "bc ", "é", "🚀" * 3]), fin=seq == 39), 0.0)
        for s in states:
            logged = sum(len(p.encode()) + LOGGED_CHUNK_OVERHEAD_BYTES for p in s.log.pieces)
            held = sum(len(c.text.encode()) + HELD_CHUNK_OVERHEAD_BYTES for c in s.reorder.held.values())
            kept = sum(len(p.content.encode()) + LOGGED_CHUNK_OVERHEAD_BYTES for p in s.surface_data.parts)
            assert s.held_bytes == logged + held + kept
            assert s.held_bytes <= limits.max_completion_bytes or s.done
        assert ledger.nbytes == sum(s.held_bytes for s in states)


# -- over all completions ------------------------------------------------------------

TEXT = "t" * (1000 - LOGGED_CHUNK_OVERHEAD_BYTES)  # one chunk of it holds exactly 1000 bytes


def _registry(client: httpx.AsyncClient) -> StreamRegistry:
    return client.app.state.registry  # type: ignore[attr-defined,no-any-return]


async def _background(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post("/v1/chat/completions", json={"messages": MSG, "background": True})


def _chunks(request_id: str, first_seq: int, count: int, *, fin: bool = False) -> list[Chunk]:
    last = first_seq + count - 1
    return [
        Chunk(request_id, seq, TEXT, fin=fin and seq == last, finish_reason="stop" if fin and seq == last else None)
        for seq in range(first_seq, last + 1)
    ]


async def test_the_total_bound_evicts_retained_first_then_refuses_then_fails_the_largest() -> None:
    # Bound 10,000 bytes: new requests are refused from 7,500 on; every chunk below holds 1,000.
    settings = Settings(sweep_interval_s=0.02, max_total_bytes=10_000)
    async with make_client(settings, FakeBackend(silent=True)) as (client, backend):
        registry = _registry(client)

        async def status_of(request_id: str) -> int:
            return (await client.get(f"/v1/chat/completions/{request_id}")).status_code

        retained = []
        for _ in range(2):
            rid = (await _background(client)).json()["id"]
            backend.deliver(_chunks(rid, 0, 2, fin=True))
            retained.append(rid)
        assert registry.held_bytes == 4_000 and list(registry.retained) == retained

        a = (await _background(client)).json()["id"]
        sent = request_nbytes(backend.submitted[-1])  # what each request in flight keeps to re-send counts too
        backend.deliver(_chunks(a, 0, 3))
        b = (await _background(client)).json()["id"]  # 7,000 held: admitted, nothing evicted
        backend.deliver(_chunks(b, 0, 1))
        assert registry.held_bytes == 8_000 + 2 * sent and [await status_of(r) for r in retained] == [200, 200]

        c = await _background(client)  # 8,000 >= 7,500: the oldest retained goes, then it is admitted
        assert c.status_code == 202
        assert [await status_of(r) for r in retained] == [404, 200]
        backend.deliver(_chunks(c.json()["id"], 0, 2))
        d = await _background(client)  # the other retained goes
        assert d.status_code == 202 and [await status_of(r) for r in retained] == [404, 404]
        backend.deliver(_chunks(d.json()["id"], 0, 2))
        assert registry.held_bytes == 8_000 + 4 * sent and not registry.retained

        refused = await _background(client)  # in flight alone hold 8,000: refused, retry later
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json()["error"]["code"] == "server_overloaded"
        assert len(registry.active) == 4

        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
        assert health["held_bytes"] == 8_000 + 4 * sent and metric(metrics, "oss_held_bytes") == 8_000 + 4 * sent

        backend.deliver(_chunks(a, 3, 3))  # 11,000 > 10,000: the largest in flight (a, 6,000) fails
        state_a = registry.get(a)
        assert state_a is None  # failed and not retained: its bytes are given back at once
        assert a in backend.cancelled  # it had been submitted: the node is told to stop
        assert registry.held_bytes == 5_000 + 3 * sent and len(registry.active) == 3

        again = await _background(client)  # room again: new requests succeed
        assert again.status_code == 202
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'oss_errors_total{code="server_overloaded"}') == 1


async def test_the_largest_in_flight_gets_an_error_event() -> None:
    """A streaming client of the request that is failed for the total bound sees an error event and [DONE]."""
    settings = Settings(sweep_interval_s=0.02, max_total_bytes=3_500)  # room for 3,000 and what the two sent
    async with make_client(settings, FakeBackend(silent=True)) as (client, backend):
        registry = _registry(client)
        big = (await _background(client)).json()["id"]
        small = (await _background(client)).json()["id"]
        sent = request_nbytes(backend.submitted[-1])  # what each request in flight keeps to re-send counts too
        backend.deliver(_chunks(small, 0, 1) + _chunks(big, 0, 2))
        state = registry.active[big]
        backend.deliver(_chunks(big, 2, 1))  # 4,000 > 3,500
        assert state.status is Status.FAILED and state.error is not None and state.error.status == 503
        assert small in registry.active and registry.held_bytes == 1_000 + sent


async def test_with_no_total_bound_nothing_is_refused() -> None:
    settings = Settings(sweep_interval_s=0.02, max_total_bytes=0)
    async with make_client(settings, FakeBackend(silent=True)) as (client, backend):
        rid = (await _background(client)).json()["id"]
        backend.deliver(_chunks(rid, 0, 50))
        assert (await _background(client)).status_code == 202


# -- what never went out is not cancelled ----------------------------------------------


async def test_a_request_that_was_never_submitted_is_not_cancelled_downstream() -> None:
    backend = FakeBackend(fail_submit=True)
    async with make_client(Settings(sweep_interval_s=0.02), backend) as (client, _):
        for stream in (True, False):
            r = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": stream})
            assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"
        metrics = (await client.get("/metrics")).text
        assert _registry(client).active == {}
    assert backend.cancelled == []
    assert metric(metrics, 'oss_completions_total{status="failed",surface="chat"}') == 2


async def test_a_submitted_request_that_fails_is_still_cancelled_downstream() -> None:
    async with make_client(Settings(sweep_interval_s=0.02, first_chunk_timeout_s=0.05), FakeBackend(silent=True)) as (
        client,
        backend,
    ):
        r = await client.post("/v1/chat/completions", json={"messages": MSG})
        deadline = time.monotonic() + 5
        while not backend.cancelled and time.monotonic() < deadline:  # the sweep applies the timeout
            await client.get("/health")
    assert r.status_code == 504 and backend.cancelled == [r.headers["x-request-id"]]
