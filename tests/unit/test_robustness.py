"""Failure paths of the HTTP layer with the in-process FakeBackend.

What depends on the wire (disconnects, timing) runs against a real uvicorn in
a thread (``tests/live.py``); finished bodies go through ``ASGITransport``.
The same paths against the real dataflow are in ``tests/e2e/test_robustness.py``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from openai_stream_protocol import Chunk
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.live import Events, LiveServer, metric, wait_metric
from tests.unit.conftest import make_client

pytestmark = pytest.mark.timeout(60)

MSG = [{"role": "user", "content": "hi there"}]
LONG = " ".join(f"w{i}" for i in range(400))


def sse_data(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


def fast(**overrides: Any) -> Settings:
    """Settings with small timeouts so that the failure paths are quick."""
    values: dict[str, Any] = {
        "sweep_interval_s": 0.02,
        "first_chunk_timeout_s": 0.5,
        "idle_timeout_s": 0.5,
        "gap_timeout_s": 0.3,
        "header_grace_s": 2.0,
    }
    values.update(overrides)
    return Settings(**values)


@asynccontextmanager
async def live(settings: Settings, backend: FakeBackend) -> AsyncIterator[tuple[LiveServer, httpx.AsyncClient]]:
    with LiveServer(create_app(settings, backend)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10, limits=httpx.Limits(max_connections=100)) as client:
            yield server, client


# -- client gone -------------------------------------------------------------


async def test_20_streams_closed_early_are_cancelled_and_freed() -> None:
    backend = FakeBackend(delay_s=0.02)
    async with live(fast(idle_timeout_s=30, first_chunk_timeout_s=30), backend) as (server, client):
        body = {"messages": [{"role": "user", "content": LONG}], "stream": True}

        async def one() -> str:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                assert r.status_code == 200
                assert len(await Events(r).take(3)) == 3
                return r.headers["x-request-id"]  # leaving the block closes the connection mid-stream

        ids = await asyncio.wait_for(asyncio.gather(*(one() for _ in range(20))), 30)
        assert await wait_metric(client, "oss_active_streams", 0) == 0
        metrics = (await client.get("/metrics")).text
    assert sorted(backend.cancelled) == sorted(ids) and len(set(ids)) == 20
    assert metric(metrics, "oss_cancellations_total") == 20
    assert metric(metrics, 'oss_completions_total{status="cancelled",surface="chat"}') == 20


async def test_non_streaming_client_gone_is_cancelled() -> None:
    backend = FakeBackend(silent=True)
    async with live(fast(first_chunk_timeout_s=30), backend) as (server, client):
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json={"messages": MSG}, timeout=0.5)
        assert await wait_metric(client, "oss_active_streams", 0) == 0
    assert len(backend.cancelled) == 1 and backend.cancelled == [r.request_id for r in backend.submitted]


async def test_client_gone_while_headers_are_held_is_cancelled_at_once() -> None:
    """The client leaves during the header grace period (no chunk yet): cancelled then, not when the grace ends."""
    backend = FakeBackend(silent=True)
    grace_s = 10.0
    async with live(fast(first_chunk_timeout_s=30, header_grace_s=grace_s), backend) as (server, client):
        started = time.monotonic()
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True}, timeout=0.3)
        assert await wait_metric(client, "oss_active_streams", 0, timeout_s=grace_s / 2) == 0
        assert time.monotonic() - started < grace_s / 2
        metrics = (await client.get("/metrics")).text
    assert len(backend.cancelled) == 1
    assert metric(metrics, "oss_cancellations_total") == 1


async def test_cancel_endpoint_ends_the_stream_and_tells_the_node() -> None:
    backend = FakeBackend(delay_s=0.02)
    async with live(fast(idle_timeout_s=30), backend) as (server, client):
        body = {"messages": [{"role": "user", "content": LONG}], "stream": True}
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            request_id = r.headers["x-request-id"]
            events = Events(r)
            await events.take(2)
            cancelled = await client.post(f"/v1/chat/completions/{request_id}/cancel")
            rest = await asyncio.wait_for(events.take(10_000), 5)
        assert await wait_metric(client, "oss_active_streams", 0) == 0
        again = await client.post(f"/v1/chat/completions/{request_id}/cancel")
        missing = await client.post("/v1/chat/completions/chatcmpl-nope/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "cancelled"
    assert backend.cancelled == [request_id]
    assert again.status_code == 200 and again.json()["status"] == "cancelled"  # idempotent, no second cancel
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "id"


# -- downstream silent or stalled ----------------------------------------------


def _first_chunk_only(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    return chunks[:1]


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream-before-headers"])
async def test_silent_node_gets_504_within_the_first_chunk_timeout(stream: bool) -> None:
    backend = FakeBackend(silent=True)
    async with make_client(fast(), backend) as (client, _):
        started = time.monotonic()
        r = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": stream})
        elapsed = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout" and r.json()["error"]["type"] == "timeout"
    assert 0.5 <= elapsed < 0.5 + 3
    assert backend.cancelled == [backend.submitted[0].request_id]
    assert metric(metrics, 'oss_timeouts_total{kind="first_chunk"}') == 1
    assert metric(metrics, 'oss_requests_total{status="504",surface="chat"}') == 1


async def test_silent_node_after_the_header_grace_gets_an_error_event() -> None:
    """First-chunk timeout longer than the header grace: the headers went out, so the error is an event."""
    backend = FakeBackend(silent=True)
    async with make_client(fast(header_grace_s=0.1, ping_interval_s=0.05), backend) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
    assert r.status_code == 200
    data = sse_data(r.text)
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "upstream_timeout"
    assert ": ping\n" in r.text
    assert backend.cancelled == [backend.submitted[0].request_id]


async def test_stalled_node_gets_an_error_event_then_done() -> None:
    backend = FakeBackend(plan=_first_chunk_only)
    async with make_client(fast(), backend) as (client, _):
        started = time.monotonic()
        r = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
        elapsed = time.monotonic() - started
        plain = await client.post("/v1/chat/completions", json={"messages": MSG})
        metrics = (await client.get("/metrics")).text
    data = sse_data(r.text)
    assert r.status_code == 200 and data[-1] == "[DONE]"
    assert json.loads(data[1])["choices"][0]["delta"]["content"] == "hi"
    assert json.loads(data[-2])["error"] == {
        "message": "the model node went silent for 0.5 s",
        "type": "timeout",
        "param": None,
        "code": "upstream_timeout",
    }
    assert elapsed < 0.5 + 3
    assert plain.status_code == 504  # nothing was sent yet for stream: false
    assert backend.cancelled == [s.request_id for s in backend.submitted]
    assert metric(metrics, 'oss_timeouts_total{kind="idle"}') == 2


async def test_a_missing_chunk_ends_the_stream_with_an_error_naming_it() -> None:
    def drop_seq_2(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return [c for c in chunks if c.seq != 2]

    backend = FakeBackend(plan=drop_seq_2)
    text = "a b c d e f"
    async with make_client(fast(), backend) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "stream": True})
        metrics = (await client.get("/metrics")).text
    data = sse_data(r.text)
    error = json.loads(data[-2])["error"]
    assert data[-1] == "[DONE]" and error["code"] == "missing_chunk" and "seq 2 " in error["message"]
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2]) == "a b"
    assert metric(metrics, 'oss_timeouts_total{kind="gap"}') == 1
    assert metric(metrics, "oss_reordered_chunks_total") >= 1
    assert backend.cancelled == [backend.submitted[0].request_id]


async def test_chunks_for_unknown_finished_or_cancelled_requests_are_dropped_and_counted() -> None:
    backend = FakeBackend()
    async with make_client(fast(), backend) as (client, _):
        done = await client.post("/v1/chat/completions", json={"messages": MSG})
        finished_id = done.headers["x-request-id"]
        backend.silent = True
        held = await client.post("/v1/chat/completions", json={"messages": MSG, "background": True})
        cancelled_id = held.json()["id"]
        await client.post(f"/v1/chat/completions/{cancelled_id}/cancel")
        backend.deliver(
            [
                Chunk("chatcmpl-unknown", 0, "stray"),
                Chunk(finished_id, 7, "late", fin=True),
                Chunk(cancelled_id, 0, "too late"),
                Chunk(None, 0, "no id at all"),
            ]
        )
        finished = (await client.get(f"/v1/chat/completions/{finished_id}")).json()
        cancelled = (await client.get(f"/v1/chat/completions/{cancelled_id}")).json()
        metrics = (await client.get("/metrics")).text
    assert finished["choices"][0]["message"]["content"] == "hi there"
    assert cancelled["status"] == "cancelled" and cancelled["choices"][0]["message"]["content"] == ""
    assert metric(metrics, 'oss_dropped_chunks_total{reason="unknown"}') == 2
    assert metric(metrics, 'oss_dropped_chunks_total{reason="late"}') == 2


# -- limits ----------------------------------------------------------------------


async def test_too_many_requests_in_flight_get_429_with_retry_after() -> None:
    backend = FakeBackend(silent=True)
    async with make_client(fast(max_active_requests=2, first_chunk_timeout_s=30), backend) as (client, _):
        held = [await client.post("/v1/chat/completions", json={"messages": MSG, "background": True}) for _ in range(2)]
        refused = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
        await client.post(f"/v1/chat/completions/{held[0].json()['id']}/cancel")
        accepted = await client.post("/v1/chat/completions", json={"messages": MSG, "background": True})
        metrics = (await client.get("/metrics")).text
    assert [h.status_code for h in held] == [202, 202]
    assert refused.status_code == 429 and refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["type"] == "rate_limit_error" and refused.json()["error"]["code"] == "too_many_requests"
    assert accepted.status_code == 202
    assert len(backend.submitted) == 3  # the refused one never went downstream
    assert metric(metrics, 'oss_requests_total{status="429",surface="chat"}') == 1


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
async def test_too_large_a_body_gets_413(declared: bool) -> None:
    backend = FakeBackend()
    body = json.dumps({"messages": [{"role": "user", "content": "x" * 5000}]}).encode()
    async with live(fast(max_body_bytes=4096), backend) as (server, client):

        async def chunked() -> AsyncIterator[bytes]:
            for i in range(0, len(body), 1000):
                yield body[i : i + 1000]

        content: Any = body if declared else chunked()
        r = await client.post("/v1/chat/completions", content=content, headers={"content-type": "application/json"})
        small = await client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "request_too_large" and r.json()["error"]["type"] == "invalid_request_error"
    assert backend.submitted[-1].texts[0].endswith("hi there") and len(backend.submitted) == 1
    assert small.status_code == 200


async def test_too_many_early_chunks_fail_the_request() -> None:
    def reversed_chunks(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return chunks[::-1]

    text = " ".join(f"t{i}" for i in range(20))
    backend = FakeBackend(plan=reversed_chunks)
    async with make_client(fast(max_buffered_chunks=4), backend) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 502 and "more than 4 chunks waiting for seq 0" in r.json()["error"]["message"]
    assert metric(metrics, 'oss_dropped_chunks_total{reason="overflow"}') == 1
    assert metric(metrics, "oss_active_streams") == 0


async def test_too_long_an_answer_fails_the_request() -> None:
    async with make_client(fast(max_completion_bytes=10)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a b c d e f g h"}]})
    assert r.status_code == 502 and "exceeded 10 bytes" in r.json()["error"]["message"]


async def test_retained_completions_are_bounded_by_count_bytes_and_age() -> None:
    async with make_client(fast(max_retained=3)) as (client, _):
        ids = [(await client.post("/v1/chat/completions", json={"messages": MSG})).headers["x-request-id"] for _ in range(5)]
        found = [(await client.get(f"/v1/chat/completions/{i}")).status_code for i in ids]
    assert found == [404, 404, 200, 200, 200]

    async with make_client(fast(max_retained_bytes=20)) as (client, _):
        ids = [(await client.post("/v1/chat/completions", json={"messages": MSG})).headers["x-request-id"] for _ in range(4)]
        found = [(await client.get(f"/v1/chat/completions/{i}")).status_code for i in ids]
    assert found == [404, 404, 200, 200]  # "hi there" is 8 bytes: two fit in 20

    async with make_client(fast(retention_s=0.1)) as (client, _):
        request_id = (await client.post("/v1/chat/completions", json={"messages": MSG})).headers["x-request-id"]
        registry = client.app.state.registry  # type: ignore[attr-defined]
        await wait_until_async(lambda: len(registry.retained) == 0, what="the sweeper to expire the retained completion")
        gone = await client.get(f"/v1/chat/completions/{request_id}")
    assert gone.status_code == 404


# -- access ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/m"),
        ("GET", "/v1/chat/completions/chatcmpl-x"),
        ("GET", "/v1/chat/completions/chatcmpl-x/stream"),
        ("POST", "/v1/chat/completions/chatcmpl-x/cancel"),
    ],
)
@pytest.mark.parametrize("header", [None, "Bearer wrong", "secret", "Basic c2VjcmV0"], ids=["missing", "wrong", "bare", "basic"])
async def test_v1_routes_need_the_api_key(method: str, path: str, header: str | None) -> None:
    backend = FakeBackend()
    async with make_client(fast(api_key="secret"), backend) as (client, _):
        headers = {"authorization": header} if header else {}
        r = await client.request(method, path, json={"messages": MSG}, headers=headers)
    assert r.status_code == 401
    assert r.json() == {
        "error": {
            "message": "Missing or wrong API key: send 'Authorization: Bearer <key>'.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert backend.submitted == []


async def test_the_right_key_passes_health_and_page_stay_open_and_metrics_need_the_key() -> None:
    async with make_client(fast(api_key="secret")) as (client, _):
        ok = await client.post("/v1/chat/completions", json={"messages": MSG}, headers={"authorization": "Bearer secret"})
        models = await client.get("/v1/models", headers={"Authorization": "Bearer secret"})
        open_routes = [(await client.get(p)).status_code for p in ("/health", "/", "/metrics")]
        metrics = (await client.get("/metrics", headers={"Authorization": "Bearer secret"})).text
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "hi there"
    assert models.status_code == 200
    assert open_routes == [200, 200, 401]
    assert metric(metrics, 'oss_requests_total{status="200",surface="chat"}') == 1


async def test_openai_sdk_with_a_wrong_key_raises_authentication_error() -> None:
    import openai

    async with live(fast(api_key="secret"), FakeBackend()) as (server, _):
        bad = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0, timeout=10)
        good = openai.AsyncOpenAI(base_url=server.base_url + "/v1", api_key="secret", max_retries=0, timeout=10)
        with pytest.raises(openai.AuthenticationError) as info:
            await bad.chat.completions.create(model="m", messages=MSG, stream=True)  # type: ignore[arg-type]
        completion = await good.chat.completions.create(model="m", messages=MSG)  # type: ignore[arg-type]
        await bad.close()
        await good.close()
    assert info.value.status_code == 401 and info.value.code == "invalid_api_key"
    assert completion.choices[0].message.content == "hi there"


async def test_cors_preflight_is_answered_for_the_configured_origin() -> None:
    origin = "https://chat.example.com"
    async with make_client(fast(cors_origins=(origin,), api_key="secret")) as (client, _):
        preflight = {"origin": origin, "access-control-request-method": "POST", "access-control-request-headers": "authorization"}
        ok = await client.options("/v1/chat/completions", headers=preflight)
        other = await client.options("/v1/chat/completions", headers={**preflight, "origin": "https://evil.example"})
        actual = await client.post(
            "/v1/chat/completions", json={"messages": MSG}, headers={"origin": origin, "authorization": "Bearer secret"}
        )
        refused = await client.post("/v1/chat/completions", json={"messages": MSG}, headers={"origin": origin})
    assert ok.status_code == 200
    assert ok.headers["access-control-allow-origin"] == origin
    assert "POST" in ok.headers["access-control-allow-methods"]
    assert "authorization" in ok.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400 and "access-control-allow-origin" not in other.headers
    assert actual.status_code == 200 and actual.headers["access-control-allow-origin"] == origin
    assert "x-request-id" in actual.headers["access-control-expose-headers"].lower()
    # a 401 still carries the CORS headers, so a browser client can read the error object
    assert refused.status_code == 401 and refused.headers["access-control-allow-origin"] == origin


async def test_cors_is_off_unless_configured() -> None:
    async with make_client(fast()) as (client, _):
        r = await client.options(
            "/v1/chat/completions", headers={"origin": "https://a.example", "access-control-request-method": "POST"}
        )
    assert "access-control-allow-origin" not in r.headers


# -- shutdown and observability ------------------------------------------------------


async def test_dataflow_stop_ends_in_flight_streams_with_an_error_event() -> None:
    backend = FakeBackend(delay_s=0.05)
    async with live(fast(idle_timeout_s=30), backend) as (server, client):
        body = {"messages": [{"role": "user", "content": LONG}], "stream": True}

        streaming: list[str] = []

        async def one() -> list[str]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                events = Events(r)
                first = await events.take(1)
                streaming.append(r.headers["x-request-id"])
                return first + await events.take(100_000)

        streams = [asyncio.ensure_future(one()) for _ in range(5)]
        await wait_until_async(lambda: len(streaming) == 5, timeout_s=10, what="all 5 streams to have begun")
        server.call(backend.stop)  # what the bridge does on dora STOP
        results = await asyncio.wait_for(asyncio.gather(*streams), 10)
        health = await client.get("/health")
    for events in results:
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "backend_unavailable"
    assert health.json()["active_streams"] == 0


async def test_model_node_gone_fails_streams_in_flight_and_refuses_new_requests() -> None:
    backend = FakeBackend(delay_s=0.05)
    async with live(fast(idle_timeout_s=30), backend) as (server, client):
        async with client.stream(
            "POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": LONG}], "stream": True}
        ) as r:
            events = Events(r)
            await events.take(2)
            server.call(lambda: backend.lose("the model node is gone (input 'chunks' closed)"))
            rest = await asyncio.wait_for(events.take(100_000), 5)
        refused = await client.post("/v1/chat/completions", json={"messages": MSG})
    assert rest[-1] == "[DONE]" and json.loads(rest[-2])["error"]["code"] == "backend_unavailable"
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "backend_unavailable"


async def test_metrics_cover_every_failure_path() -> None:
    """Each failure path is caused once and its counter read exactly: a duplicate, early chunks, a gap, a 400, a cancel."""

    def chaos(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        if "hold" in request.texts[-1]:
            return []  # nothing until the client cancels it
        if "gap" in request.texts[-1]:
            return [c for c in chunks[::-1] if c.seq != 1]  # seq 4 (fin), 3, 2 held; 0 delivered; 1 never comes
        return chunks[:1] + chunks[:1] + chunks[2:] + chunks[1:2]  # a duplicate, then 2, 3, 4 (fin) held until 1

    backend = FakeBackend(plan=chaos)
    async with make_client(fast(), backend) as (client, _):
        ok = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a b c d"}]})
        gap = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "gap a b c"}], "stream": True}
        )
        bad = await client.post("/v1/chat/completions", json={"messages": []})
        held = await client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hold"}], "background": True}
        )
        cancelled = await client.post(f"/v1/chat/completions/{held.json()['id']}/cancel")
        metrics = (await client.get("/metrics")).text
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == "a b c d"
    assert gap.status_code == 200 and json.loads(sse_data(gap.text)[-2])["error"]["code"] == "missing_chunk"
    assert bad.status_code == 400 and held.status_code == 202
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert backend.cancelled == [gap.headers["x-request-id"], held.json()["id"]]  # the gap's node is told to stop too
    expected = {
        'oss_requests_total{status="200",surface="chat"}': 3,  # the two completions and the cancel route
        'oss_requests_total{status="202",surface="chat"}': 1,
        'oss_requests_total{status="400",surface="chat"}': 1,
        "oss_active_streams": 0,
        "oss_sse_events_total": 1,  # the gap stream's first token; error events are not counted
        'oss_dropped_chunks_total{reason="duplicate"}': 1,
        'oss_dropped_chunks_total{reason="late"}': 0,
        'oss_dropped_chunks_total{reason="unknown"}': 0,
        "oss_reordered_chunks_total": 6,
        "oss_cancellations_total": 1,
        'oss_timeouts_total{kind="gap"}': 1,
        'oss_errors_total{code="missing_chunk"}': 1,
        'oss_completions_total{status="completed",surface="chat"}': 1,
        'oss_completions_total{status="failed",surface="chat"}': 1,
        'oss_completions_total{status="cancelled",surface="chat"}': 1,
        "oss_time_to_first_chunk_seconds_count": 2,  # the cancelled one never had a chunk
    }
    assert {name: metric(metrics, name, 0) for name in expected} == expected
    assert metric(metrics, "oss_chunks_total") > 0
    assert metric(metrics, "oss_inter_chunk_seconds_count") > 0
