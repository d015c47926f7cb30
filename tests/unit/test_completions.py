"""/v1/completions over httpx.ASGITransport with the in-process FakeBackend.

The client-gone path runs against a real uvicorn (``tests/live.py``): ``ASGITransport`` buffers
whole bodies and sends ``http.disconnect`` only once the response is complete.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import openai
import pytest
from openai.types import Completion

from openai_stream_protocol import Chunk, Part, split_tokens
from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.live import Events, LiveServer, metric, wait_metric
from tests.unit.conftest import make_client

PROMPT = "Hello   there,\n general  Kenobi "
TOKENS = len(split_tokens(PROMPT))  # the fake counts tokens the way echo_stream does
CHOICE_KEYS = {"text", "index", "logprobs", "finish_reason"}


def events_of(body: str) -> list[str]:
    """Every SSE event's data, checking the bytes: each event one ``data:`` line and a blank line, nothing else."""
    assert body.endswith("\n\n")
    blocks = body[:-2].split("\n\n")
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks), blocks
    return [b[len("data: ") :] for b in blocks]


def chunks_of(body: str) -> list[dict[str, Any]]:
    data = events_of(body)
    assert data[-1] == "[DONE]" and "[DONE]" not in data[:-1]
    return [json.loads(d) for d in data[:-1]]


async def test_stream_chunk_shapes() -> None:
    async with make_client(backend=FakeBackend(delay_s=0.001)) as (client, backend):
        r = await client.post("/v1/completions", json={"model": "gpt-x", "prompt": PROMPT, "stream": True})
        other = await client.post("/v1/completions", json={"model": "gpt-x", "prompt": PROMPT})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    request_id = r.headers["x-request-id"]
    # The legacy id shape (``cmpl-`` and 24 hex digits, not chat's ``chatcmpl-``), fresh for every request.
    assert re.fullmatch(r"cmpl-[0-9a-f]{24}", request_id), request_id
    assert re.fullmatch(r"cmpl-[0-9a-f]{24}", other.json()["id"]) and other.json()["id"] != request_id
    chunks = chunks_of(r.text)
    assert len(chunks) == TOKENS + 1  # no role chunk: one per token, then the finish chunk
    for chunk in chunks:
        assert set(chunk) == {"id", "object", "created", "model", "system_fingerprint", "choices"}
        assert (chunk["id"], chunk["object"], chunk["model"]) == (request_id, "text_completion", "gpt-x")
        assert len(chunk["choices"]) == 1 and set(chunk["choices"][0]) == CHOICE_KEYS
        assert chunk["choices"][0]["index"] == 0 and chunk["choices"][0]["logprobs"] is None
    assert "".join(c["choices"][0]["text"] for c in chunks) == PROMPT
    assert all(c["choices"][0]["text"] for c in chunks[:-1])
    reasons = [c["choices"][0]["finish_reason"] for c in chunks]
    assert reasons[-1] == "stop" and set(reasons[:-1]) == {None}
    assert chunks[-1]["choices"][0]["text"] == ""
    Completion.model_validate(chunks[-1])  # the SDK's type; earlier chunks' null finish_reason it only constructs
    request = backend.submitted[0]
    assert request.texts == [Part("user", "text", PROMPT).encode()]
    assert request.metadata["request_id"] == request_id and request.metadata["stream"] is True


async def test_include_usage_adds_a_final_usage_chunk() -> None:
    async with make_client() as (client, _):
        r = await client.post(
            "/v1/completions", json={"prompt": PROMPT, "stream": True, "stream_options": {"include_usage": True}}
        )
    chunks = chunks_of(r.text)
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    last = chunks[-1]
    assert last["object"] == "text_completion" and last["choices"] == []
    assert last["usage"] == {"prompt_tokens": TOKENS, "completion_tokens": TOKENS, "total_tokens": 2 * TOKENS}
    assert Completion.model_validate(last).usage is not None


async def test_non_streaming_completion_and_sampling_metadata() -> None:
    body = {"model": "m", "prompt": [PROMPT], "max_tokens": 2, "temperature": 0.5, "top_p": 0.9, "stop": "x", "seed": 3}
    async with make_client() as (client, backend):
        r = await client.post("/v1/completions", json=body)
        listed = await client.post("/v1/completions", json={"prompt": "a b", "stop": ["p", "q", "r", "s"]})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    completion = r.json()
    assert completion == {
        "id": r.headers["x-request-id"],
        "object": "text_completion",
        "created": completion["created"],
        "model": "m",
        "system_fingerprint": None,
        "choices": [{"text": "Hello   there,", "index": 0, "logprobs": None, "finish_reason": "length"}],
        "usage": {"prompt_tokens": TOKENS, "completion_tokens": 2, "total_tokens": TOKENS + 2},
    }
    assert isinstance(completion["created"], int)
    assert Completion.model_validate(completion).choices[0].text == "Hello   there,"
    metadata = backend.submitted[0].metadata
    assert (metadata["max_tokens"], metadata["temperature"], metadata["top_p"], metadata["stop"], metadata["seed"]) == (
        2,
        0.5,
        0.9,
        ["x"],
        3,
    )
    assert metadata["stream"] is False
    assert backend.submitted[0].texts == [Part("user", "text", PROMPT).encode()]  # the list's one string
    assert listed.json()["choices"][0] == {"text": "a b", "index": 0, "logprobs": None, "finish_reason": "stop"}
    assert backend.submitted[1].metadata["stop"] == ["p", "q", "r", "s"]
    assert "temperature" not in backend.submitted[1].metadata and backend.submitted[1].metadata["max_tokens"] == 0


async def test_accepted_fields_and_unknown_fields() -> None:
    body = {
        "prompt": "hi",
        "echo": False,
        "n": 1,
        "logprobs": None,
        "suffix": None,
        "best_of": 1,
        "user": "u",
        "frequency_penalty": 0,
        "logit_bias": {},
    }
    async with make_client() as (client, _):
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "hi"


@pytest.mark.parametrize(
    "body, param",
    [
        pytest.param({}, "prompt", id="missing-prompt"),
        pytest.param({"prompt": None}, "prompt", id="null-prompt"),
        pytest.param({"prompt": 5}, "prompt", id="prompt-number"),
        pytest.param({"prompt": []}, "prompt", id="no-prompts"),
        pytest.param({"prompt": ["a", "b"]}, "prompt", id="two-prompts"),
        pytest.param({"prompt": [1, 2, 3]}, "prompt", id="token-array"),
        pytest.param({"prompt": [[1, 2], [3]]}, "prompt", id="token-arrays"),
        pytest.param({"prompt": "hi", "echo": True}, "echo", id="echo"),
        pytest.param({"prompt": "hi", "echo": "no"}, "echo", id="echo-type"),
        pytest.param({"prompt": "hi", "n": 2}, "n", id="n-2"),
        pytest.param({"prompt": "hi", "logprobs": 0}, "logprobs", id="logprobs-0"),
        pytest.param({"prompt": "hi", "logprobs": 5}, "logprobs", id="logprobs-5"),
        pytest.param({"prompt": "hi", "suffix": "end"}, "suffix", id="suffix"),
        pytest.param({"prompt": "hi", "suffix": ""}, "suffix", id="suffix-empty"),
        pytest.param({"prompt": "hi", "max_tokens": 0}, "max_tokens", id="max-tokens-0"),
        pytest.param({"prompt": "hi", "max_tokens": "5"}, "max_tokens", id="max-tokens-string"),
        pytest.param({"prompt": "hi", "temperature": 2.5}, "temperature", id="temperature-range"),
        pytest.param({"prompt": "hi", "top_p": 1.5}, "top_p", id="top-p-range"),
        pytest.param({"prompt": "hi", "stop": ["a", "b", "c", "d", "e"]}, "stop", id="five-stops"),
        pytest.param({"prompt": "hi", "stop": [1]}, "stop[0]", id="stop-type"),
        pytest.param({"prompt": "hi", "seed": 2**63}, "seed", id="seed-range"),
        pytest.param({"prompt": "hi", "stream": "yes"}, "stream", id="stream-type"),
        pytest.param({"prompt": "hi", "model": 7}, "model", id="model-type"),
        pytest.param(
            {"prompt": "hi", "stream_options": {"include_usage": "y"}}, "stream_options.include_usage", id="include-usage-type"
        ),
    ],
)
async def test_bad_input_gets_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/completions", json=body)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error" and error["code"] and param.split(".")[0].split("[")[0] in error["message"]
    assert r.headers["x-request-id"].startswith("cmpl-")
    assert backend.submitted == []


async def test_invalid_json_and_unknown_model() -> None:
    async with make_client(Settings(models=("qwen",))) as (client, backend):
        broken = await client.post("/v1/completions", content=b"{nope", headers={"content-type": "application/json"})
        missing = await client.post("/v1/completions", json={"prompt": "hi", "model": "gpt-4"})
    assert broken.status_code == 400 and broken.json()["error"]["code"] == "invalid_json"
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "model"
    assert backend.submitted == []


async def test_errors_before_and_after_the_headers() -> None:
    async with make_client(backend=FakeBackend(fail_submit=True)) as (client, _):
        down = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
    assert down.status_code == 503 and down.json()["error"]["code"] == "backend_unavailable"
    assert down.headers["x-request-id"].startswith("cmpl-")

    def node_error(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return [Chunk(request.request_id, 0, "", fin=True, finish_reason="error", error="model exploded")]

    def fail_midway(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        return [*chunks[:2], Chunk(request.request_id, 2, "", fin=True, finish_reason="error", error="lost the GPU")]

    async with make_client(backend=FakeBackend(plan=node_error)) as (client, _):
        early = await client.post("/v1/completions", json={"prompt": "hi", "stream": True})
        plain = await client.post("/v1/completions", json={"prompt": "hi"})
    assert early.status_code == 502 and "model exploded" in early.json()["error"]["message"]
    assert plain.status_code == 502 and "model exploded" in plain.json()["error"]["message"]

    async with make_client(backend=FakeBackend(plan=fail_midway)) as (client, _):
        late = await client.post("/v1/completions", json={"prompt": PROMPT, "stream": True})
    data = events_of(late.text)
    assert late.status_code == 200 and data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["message"] == "lost the GPU"
    assert "".join(json.loads(d)["choices"][0]["text"] for d in data[:-2]) == "Hello   there,"


async def test_the_openai_sdk_reads_both_shapes() -> None:
    async with make_client() as (client, backend):
        sdk = openai.AsyncOpenAI(api_key="none", base_url="http://localhost/v1", http_client=client, max_retries=0)
        stream = await sdk.completions.create(
            model="m", prompt=PROMPT, stream=True, stream_options={"include_usage": True}, max_tokens=3
        )
        chunks = [chunk async for chunk in stream]
        whole = await sdk.completions.create(model="m", prompt=PROMPT)
        with pytest.raises(openai.BadRequestError) as refused:
            await sdk.completions.create(model="m", prompt=PROMPT, echo=True)
    assert all(isinstance(c, Completion) for c in chunks)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "Hello   there,\n general"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    assert whole.choices[0].text == PROMPT and whole.choices[0].finish_reason == "stop"
    assert refused.value.param == "echo" and refused.value.status_code == 400
    assert len(backend.submitted) == 2


async def test_client_gone_cancels_downstream() -> None:
    backend = FakeBackend(delay_s=0.02)
    settings = Settings(sweep_interval_s=0.02)
    long_prompt = " ".join(f"w{i}" for i in range(400))
    with LiveServer(create_app(settings, backend)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            body = {"prompt": long_prompt, "stream": True}
            async with client.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                first = await asyncio.wait_for(Events(r).take(3), 10)
                request_id = r.headers["x-request-id"]
            assert await wait_metric(client, "oss_active_streams", 0) == 0
            metrics = (await client.get("/metrics")).text
    assert [json.loads(e)["choices"][0]["text"] for e in first] == ["w0", " w1", " w2"]
    assert backend.cancelled == [request_id]
    assert metric(metrics, 'oss_completions_total{status="cancelled",surface="completions"}') == 1
    assert metric(metrics, 'oss_requests_total{status="200",surface="completions"}') == 1
