"""Reasoning on /v1/chat/completions (and /v1/completions): where the reasoning goes, its usage, and what reaches the node."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from openai_stream_protocol import Chunk, request_reasoning
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

USER = [{"role": "user", "content": "hi"}]


def thinking(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    """Two reasoning pieces (one empty), then the answer in two pieces; the node counts 5 tokens, 2 of them reasoning."""
    rid = request.request_id
    return [
        Chunk(rid, 0, "The user greets. ", reasoning=True),
        Chunk(rid, 1, "", reasoning=True),
        Chunk(rid, 2, "Greet back.", reasoning=True),
        Chunk(rid, 3, "Hello"),
        Chunk(rid, 4, " there!", fin=True, finish_reason="stop", completion_tokens=5, reasoning_tokens=2),
    ]


def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)


def data_events(body: str) -> list[dict[str, Any]]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: {")]


@pytest.mark.parametrize(
    "field, keys",
    [("reasoning_content", ["reasoning_content"]), ("reasoning", ["reasoning"]), ("both", ["reasoning_content", "reasoning"])],
)
async def test_the_stream_puts_reasoning_in_the_field_the_server_is_told(field: str, keys: list[str]) -> None:
    async with make_client(Settings(sweep_interval_s=0.02, reasoning_field=field), FakeBackend(plan=thinking)) as (client, _):
        body = {"model": "m", "messages": USER, "stream": True, "stream_options": {"include_usage": True}}
        events = data_events((await client.post("/v1/chat/completions", json=body)).text)
    deltas = [e["choices"][0]["delta"] for e in events if e["choices"]]
    thoughts = [d for d in deltas if set(d) & {"reasoning_content", "reasoning"}]
    assert thoughts and all(sorted(d) == sorted(keys) for d in thoughts), "reasoning deltas hold only the reasoning"
    for key in keys:
        assert "".join(d[key] for d in thoughts) == "The user greets. Greet back."
    assert "".join(d.get("content") or "" for d in deltas) == "Hello there!"
    assert all(not d[key] == "" for d in thoughts for key in keys), "no empty reasoning deltas"
    first_text = next(i for i, d in enumerate(deltas) if d.get("content"))
    assert all(i < first_text for i, d in enumerate(deltas) if d in thoughts), "the reasoning comes before the answer"
    assert events[-1]["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": 5,
        "total_tokens": 6,
        "completion_tokens_details": {"reasoning_tokens": 2},
    }


async def test_the_sdk_reads_it_streamed_and_whole() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        async with sdk(client).chat.completions.stream(model="m", messages=USER) as stream:  # type: ignore[arg-type]
            final = await stream.get_final_completion()
        message = final.choices[0].message
        assert message.content == "Hello there!"
        assert message.model_extra is not None and message.model_extra["reasoning_content"] == "The user greets. Greet back."
        whole = await sdk(client).chat.completions.create(model="m", messages=USER)  # type: ignore[arg-type]
    assert whole.choices[0].message.content == "Hello there!"
    assert whole.choices[0].message.model_extra["reasoning_content"] == "The user greets. Greet back."  # type: ignore[index]
    assert whole.usage is not None and whole.usage.completion_tokens_details is not None
    assert whole.usage.completion_tokens_details.reasoning_tokens == 2


async def test_an_answer_without_reasoning_is_unchanged() -> None:
    async with make_client() as (client, _):
        whole = (await client.post("/v1/chat/completions", json={"model": "m", "messages": USER})).json()
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "hi", "refusal": None}
    assert set(whole["usage"]) == {"prompt_tokens", "completion_tokens", "total_tokens"}


async def test_reattach_and_retrieve_keep_the_reasoning() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        created = (await client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "background": True})).json()
        replay = (await client.get(f"{created['stream_url']}?starting_after=1")).text
        got = (await client.get(f"/v1/chat/completions/{created['id']}")).json()
    assert got["choices"][0]["message"]["reasoning_content"] == "The user greets. Greet back."
    thoughts = [e for e in data_events(replay) if e["choices"] and "reasoning_content" in e["choices"][0]["delta"]]
    assert [(e["sequence_number"], e["choices"][0]["delta"]["reasoning_content"]) for e in thoughts] == [(2, "Greet back.")]


@pytest.mark.parametrize("effort", ["none", "minimal", "low", "medium", "high", "xhigh"])
async def test_reasoning_effort_reaches_the_node(effort: str) -> None:
    async with make_client() as (client, backend):
        response = await client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "reasoning_effort": effort})
    assert response.status_code == 200
    wish = request_reasoning(backend.submitted[0].metadata)
    assert wish is not None and wish.effort == effort and wish.enabled is (effort != "none")


async def test_no_effort_sends_no_entry_and_a_bad_one_is_named() -> None:
    async with make_client() as (client, backend):
        await client.post("/v1/chat/completions", json={"model": "m", "messages": USER})
        bad = await client.post("/v1/chat/completions", json={"model": "m", "messages": USER, "reasoning_effort": "max"})
    assert "reasoning" not in backend.submitted[0].metadata
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning_effort"


async def test_a_text_completion_sends_only_the_answer() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        whole = (await client.post("/v1/completions", json={"model": "m", "prompt": "hi"})).json()
        streamed = data_events((await client.post("/v1/completions", json={"model": "m", "prompt": "hi", "stream": True})).text)
    assert whole["choices"][0]["text"] == "Hello there!"
    assert whole["usage"]["completion_tokens_details"] == {"reasoning_tokens": 2}
    assert "".join(e["choices"][0]["text"] for e in streamed) == "Hello there!"
