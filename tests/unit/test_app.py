"""The HTTP layer over httpx.ASGITransport with the in-process FakeBackend."""

from __future__ import annotations

import asyncio
import json
import random
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from openai_stream_protocol import Chunk, split_tokens
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

USER = [{"role": "user", "content": "Hello   there,\n general  Kenobi "}]
TEXT = USER[0]["content"]


def sse_data(body: str) -> list[str]:
    return [line[len("data: ") :] for line in body.split("\n") if line.startswith("data: ")]


def chunks_of(body: str) -> list[dict[str, Any]]:
    data = sse_data(body)
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


async def test_stream_chunk_shapes() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, backend):
        r = await client.post("/v1/chat/completions", json={"model": "gpt-x", "messages": USER, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    assert "id:" not in r.text
    chunks = chunks_of(r.text)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["id"] for c in chunks} == {r.headers["x-request-id"]}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"gpt-x"}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == TEXT
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "stop" and reasons.count("stop") == 1 and set(reasons[:-1]) == {None}
    assert all("usage" not in c for c in chunks)
    request = backend.submitted[0]
    assert request.metadata["request_id"] == request.metadata["session_id"] == r.headers["x-request-id"]
    assert request.metadata["stream"] is True and request.metadata["model"] == "gpt-x"


async def test_include_usage_adds_a_final_usage_chunk() -> None:
    async with make_client() as (client, _):
        r = await client.post(
            "/v1/chat/completions",
            json={"messages": USER, "stream": True, "stream_options": {"include_usage": True}},
        )
    chunks = chunks_of(r.text)
    assert all("usage" in c for c in chunks)
    assert all(c["usage"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"] == []
    tokens = len(split_tokens(TEXT))  # the fake counts tokens the way echo_stream does
    assert last["usage"] == {"prompt_tokens": tokens, "completion_tokens": tokens, "total_tokens": 2 * tokens}


async def test_non_streaming_completion() -> None:
    async with make_client() as (client, backend):
        r = await client.post(
            "/v1/chat/completions",
            json={"model": "m", "messages": USER, "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "stop": "x", "seed": 3},
        )
    body = r.json()
    assert r.status_code == 200 and body["object"] == "chat.completion" and body["id"] == r.headers["x-request-id"]
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello   there,", "refusal": None}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2
    metadata = backend.submitted[0].metadata
    assert (metadata["max_tokens"], metadata["temperature"], metadata["top_p"], metadata["stop"], metadata["seed"]) == (
        2,
        0.5,
        0.9,
        ["x"],
        3,
    )
    assert metadata["stream"] is False


async def test_image_parts_travel_in_the_dora_hub_convention() -> None:
    messages = [
        {"role": "system", "content": "sys"},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is in this image?"},
                {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
            ],
        },
    ]
    async with make_client() as (client, backend):
        r = await client.post("/v1/chat/completions", json={"messages": messages})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "What is in this image?"
    assert backend.submitted[0].texts == [
        "<|system|>\nsys",
        "<|user|>\n<|im_start|>\nWhat is in this image?",
        "<|user|>\n<|vision_start|>\nhttps://example.com/cat.jpg",
        "<|user|>\n<|vision_start|>\ndata:image/png;base64,iVBORw0KGgo=",
    ]


def _chaos(seed: int, sent: list[Chunk]):  # type: ignore[no-untyped-def]
    """Half the chunks again as duplicates, all shuffled, then one straggler copy after the end; recorded in ``sent``."""

    def plan(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rng = random.Random(seed)
        out = chunks + rng.sample(chunks, len(chunks) // 2)
        rng.shuffle(out)
        out.append(rng.choice(chunks))  # arrives once the stream has ended: late
        sent.extend(out)
        return out

    return plan


def _expected_outcomes(sent: list[Chunk]) -> dict[str, int]:
    """How a reorder buffer must classify ``sent``, one chunk at a time: held early, duplicate, or late (after the end)."""
    counts = {"reordered": 0, "duplicate": 0, "late": 0}
    seen: set[int] = set()
    next_seq, fin_seq = 0, None
    for chunk in sent:
        assert chunk.seq is not None
        if fin_seq is not None and next_seq > fin_seq:
            counts["late"] += 1
            continue
        if chunk.seq in seen:
            counts["duplicate"] += 1
            continue
        seen.add(chunk.seq)
        if chunk.fin:
            fin_seq = chunk.seq
        if chunk.seq > next_seq:
            counts["reordered"] += 1
        while next_seq in seen:
            next_seq += 1
    return counts


def _samples(metrics: str) -> dict[str, float]:
    """Every sample of a Prometheus text page, keyed ``name{label="value",...}`` as it is written."""
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return samples


@pytest.mark.parametrize("seed", range(5))
async def test_out_of_order_and_duplicate_chunks_are_reordered(seed: int) -> None:
    text = " ".join(f"tok{i}" for i in range(60))
    sent: list[Chunk] = []
    async with make_client(backend=FakeBackend(plan=_chaos(seed, sent))) as (client, _):
        before = _samples((await client.get("/metrics")).text)
        r = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}], "stream": True})
        extra = len(sent) - 61  # 60 tokens and the finish marker, then the duplicates

        async def every_chunk_counted() -> dict[str, float]:
            # copies sent after the end may still be on their way when the response is complete
            now = _samples((await client.get("/metrics")).text)
            dropped = sum(v for k, v in now.items() if k.startswith("oss_dropped_chunks_total"))
            return now if dropped - sum(v for k, v in before.items() if k.startswith("oss_dropped_chunks_total")) >= extra else {}

        after = await wait_until_async(every_chunk_counted, what=f"{extra} dropped copies to be counted")
    chunks = chunks_of(r.text)
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == text
    assert [c["choices"][0]["finish_reason"] for c in chunks].count("stop") == 1
    expected = _expected_outcomes(sent)
    assert extra == 31 and expected["duplicate"] + expected["late"] == extra and expected["late"] >= 1

    def increase(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert {
        "duplicate": increase('oss_dropped_chunks_total{reason="duplicate"}'),
        "late": increase('oss_dropped_chunks_total{reason="late"}'),
        "reordered": increase("oss_reordered_chunks_total"),
    } == expected
    assert increase('oss_dropped_chunks_total{reason="unknown"}') == 0


async def test_concurrent_streams_do_not_cross() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, _):

        async def one(i: int) -> str:
            r = await client.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "user", "content": f"prompt {i} " * 5}], "stream": True},
            )
            return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks_of(r.text))

        answers = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(30))), 30)
    assert answers == [f"prompt {i} " * 5 for i in range(30)]


async def test_legacy_replies_match_by_request_id_or_fifo() -> None:
    backend = FakeBackend(silent=True)
    async with make_client(backend=backend) as (client, _):
        first = asyncio.ensure_future(
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "one"}]})
        )
        second = asyncio.ensure_future(
            client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "two"}]})
        )
        await wait_until_async(lambda: len(backend.submitted) == 2, what="both requests to reach the backend")
        one, two = backend.submitted
        backend.deliver([Chunk(two.request_id, None, "answer two", fin=True, finish_reason="stop")])  # dora-echo passes ids back
        backend.deliver([Chunk(None, None, "answer one", fin=True, finish_reason="stop")])  # no id: oldest waiting
        r1, r2 = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert r1.json()["choices"][0]["message"]["content"] == "answer one"
    assert r2.json()["choices"][0]["message"]["content"] == "answer two"


async def test_models_default_accepts_any_name() -> None:
    async with make_client() as (client, _):
        models = (await client.get("/v1/models")).json()
        r = await client.post("/v1/chat/completions", json={"model": "gpt-3.5-turbo", "messages": USER})
    assert [m["id"] for m in models["data"]] == ["dora-stream"]
    assert r.status_code == 200 and r.json()["model"] == "gpt-3.5-turbo"


async def test_configured_models_reject_others() -> None:
    async with make_client(Settings(models=("qwen", "echo"))) as (client, _):
        models = (await client.get("/v1/models")).json()
        ok = await client.post("/v1/chat/completions", json={"model": "echo", "messages": USER})
        bad = await client.post("/v1/chat/completions", json={"model": "gpt-4", "messages": USER})
        card = await client.get("/v1/models/qwen")
        missing = await client.get("/v1/models/gpt-4")
    assert [m["id"] for m in models["data"]] == ["qwen", "echo"]
    assert ok.status_code == 200
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found" and bad.json()["error"]["param"] == "model"
    assert card.json()["id"] == "qwen" and missing.status_code == 404


MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "body, status, param",
    [
        pytest.param(b"{not json", 400, None, id="invalid-json"),
        pytest.param(b"[1, 2]", 400, None, id="not-an-object"),
        pytest.param({}, 400, "messages", id="missing-messages"),
        pytest.param({"messages": []}, 400, "messages", id="empty-messages"),
        pytest.param({"messages": "hi"}, 400, "messages", id="messages-not-a-list"),
        pytest.param({"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role", id="unknown-role"),
        pytest.param({"messages": [{"content": "x"}]}, 400, "messages[0].role", id="missing-role"),
        pytest.param({"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content", id="content-type"),
        pytest.param({"messages": [{"role": "user"}]}, 400, "messages[0]", id="missing-content"),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            400,
            "messages[0].content[0].type",
            id="unknown-part-type",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            400,
            "messages[0].content[0]",
            id="image-part-without-url",
        ),
        pytest.param(
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": 3}}]}]},
            400,
            "messages[0].content[0].image_url.url",
            id="url-type",
        ),
        pytest.param({"messages": MSG, "n": 2}, 400, "n", id="n-2"),
        pytest.param({"messages": MSG, "max_tokens": -1}, 400, "max_tokens", id="negative-max-tokens"),
        pytest.param({"messages": MSG, "max_tokens": "5"}, 400, "max_tokens", id="max-tokens-string"),
        pytest.param({"messages": MSG, "temperature": 2.5}, 400, "temperature", id="temperature-range"),
        pytest.param({"messages": MSG, "top_p": -0.1}, 400, "top_p", id="top-p-range"),
        pytest.param({"messages": MSG, "stream": "yes"}, 400, "stream", id="stream-type"),
        pytest.param({"messages": MSG, "model": 7}, 400, "model", id="model-type"),
        pytest.param({"messages": MSG, "stop": [1]}, 400, "stop", id="stop-type"),
        pytest.param(
            {"messages": MSG, "stream_options": {"include_usage": "y"}},
            400,
            "stream_options.include_usage",
            id="include-usage-type",
        ),
    ],
)
async def test_bad_input_gets_a_4xx_naming_the_field(body: Any, status: int, param: str | None) -> None:
    async with make_client() as (client, backend):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = await client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
        refused_submitted = list(backend.submitted)
        after = await client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == status
    error = r.json()["error"]
    assert error["param"] == param or (param and error["param"] and error["param"].startswith(param))
    assert error["type"] == "invalid_request_error" and error["message"] and error["code"]
    if param:
        assert param.split("[")[0].split(".")[0] in error["message"]
    assert r.headers["x-request-id"].startswith("chatcmpl-")
    assert refused_submitted == []  # refused before anything reaches the model
    assert after.status_code == 200  # the server keeps serving
    assert [s.request_id for s in backend.submitted] == [after.headers["x-request-id"]]


async def test_unknown_fields_are_ignored() -> None:
    async with make_client() as (client, _):
        r = await client.post(
            "/v1/chat/completions",
            json={"messages": MSG, "user": "u", "tools": [], "logit_bias": {}, "frequency_penalty": 0, "n": 1, "store": False},
        )
    assert r.status_code == 200


async def test_backend_down_is_503_and_node_error_is_an_error() -> None:
    async with make_client(backend=FakeBackend(fail_submit=True)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
    assert r.status_code == 503 and r.json()["error"]["code"] == "backend_unavailable"

    def node_error(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return [Chunk(request.request_id, 0, "", fin=True, finish_reason="error", error="model exploded")]

    async with make_client(backend=FakeBackend(plan=node_error)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": MSG, "stream": True})
    assert r.status_code == 502 and "model exploded" in r.json()["error"]["message"]


async def test_error_after_streaming_began_is_an_event_then_done() -> None:
    def fail_midway(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return [*chunks[:2], Chunk(request.request_id, 2, "", fin=True, finish_reason="error", error="lost the GPU")]

    async with make_client(backend=FakeBackend(plan=fail_midway)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": USER, "stream": True})
    assert r.status_code == 200
    data = sse_data(r.text)
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["message"] == "lost the GPU"
    assert "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-2]) == "Hello   there,"


async def test_health_and_metrics() -> None:
    async with make_client() as (client, _):
        await client.post("/v1/chat/completions", json={"messages": MSG})
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
    assert health["status"] == "ok" and health["connected"] is True
    for name in ("oss_requests_total", "oss_active_streams", "oss_chunks_total", "oss_time_to_first_chunk_seconds_bucket"):
        assert name in metrics


async def test_reattach_stream_takes_the_api_key_as_a_query_parameter() -> None:
    """EventSource cannot send an Authorization header; the reattach GET accepts ``?api_key=``."""
    async with make_client(Settings(api_key="secret")) as (client, _):
        auth = {"Authorization": "Bearer secret"}
        created = await client.post("/v1/chat/completions", json={"messages": MSG, "background": True}, headers=auth)
        url = created.json()["stream_url"]
        ok = await client.get(url, params={"api_key": "secret"})
        wrong = await client.get(url, params={"api_key": "nope"})
        not_here = await client.get(url.removesuffix("/stream"), params={"api_key": "secret"})
    assert created.status_code == 202
    assert ok.status_code == 200 and sse_data(ok.text)[-1] == "[DONE]"
    assert wrong.status_code == 401 and not_here.status_code == 401


async def test_byte_limits_count_utf8_bytes() -> None:
    def emoji(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return [Chunk(request.request_id, 0, "🚀" * 10, fin=True, finish_reason="stop")]

    async with make_client(Settings(max_completion_bytes=30), FakeBackend(plan=emoji)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": MSG})
    assert r.status_code == 502 and "30 bytes" in r.json()["error"]["message"]  # 40 bytes, only 10 characters
