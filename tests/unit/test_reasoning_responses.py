"""Reasoning on /v1/responses: a reasoning item before the message, its events numbered and resumable, its usage."""

from __future__ import annotations

from typing import Any

import openai
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

from openai_stream_protocol import Chunk, ToolCallDelta, request_reasoning
from openai_stream_server.backend import DownstreamRequest
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client
from tests.unit.test_responses import named_events

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)


def thinking(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    """Empty text (held back), reasoning in two pieces and an empty one, the answer in two pieces."""
    rid = request.request_id
    return [
        Chunk(rid, 0, ""),
        Chunk(rid, 1, "Think ", reasoning=True),
        Chunk(rid, 2, "", reasoning=True),
        Chunk(rid, 3, "hard.", reasoning=True),
        Chunk(rid, 4, "Hi"),
        Chunk(rid, 5, "!", fin=True, finish_reason="stop", completion_tokens=4, reasoning_tokens=2),
    ]


def thinking_then_calling(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    rid = request.request_id
    return [
        Chunk(rid, 0, "Need the weather.", reasoning=True),
        Chunk(rid, 1, '{"city": "Paris"}', tool_call=ToolCallDelta(0, "call_w", "get_weather")),
        Chunk(rid, 2, "", fin=True, finish_reason="tool_calls"),
    ]


EXPECTED_TYPES = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",  # the reasoning item (the held empty text opens nothing)
    "response.content_part.added",
    "response.reasoning_text.delta",
    "response.reasoning_text.delta",
    "response.reasoning_text.delta",
    "response.reasoning_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.output_item.added",  # the message
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


def sdk(client: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)


async def test_the_reasoning_item_comes_first_and_every_event_is_numbered() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        body = (await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})).text
    events = named_events(body)
    assert [e.event for e in events] == EXPECTED_TYPES
    assert [e.data["sequence_number"] for e in events] == list(range(len(events)))
    for event in events:
        STREAM_EVENT.validate_python(event.data)  # each one is an event the SDK knows
    done = [e.data for e in events if e.event == "response.output_item.done"]
    assert done[0]["item"] == {
        "id": done[0]["item"]["id"],
        "type": "reasoning",
        "status": "completed",
        "summary": [],
        "content": [{"type": "reasoning_text", "text": "Think hard."}],
    }
    assert done[0]["item"]["id"].startswith("rs_") and done[0]["output_index"] == 0
    assert done[1]["item"]["content"][0]["text"] == "Hi!" and done[1]["output_index"] == 1
    final = events[-1].data["response"]
    assert [item["type"] for item in final["output"]] == ["reasoning", "message"]
    assert final["usage"]["output_tokens_details"] == {"reasoning_tokens": 2}
    assert final["usage"]["output_tokens"] == 4


async def test_resume_after_any_event_gets_the_same_events() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        created = (await client.post("/v1/responses", json={"model": "m", "input": "hi", "background": True})).json()
        full = named_events((await client.get(f"/v1/responses/{created['id']}?stream=true")).text)
        for after in range(len(full)):
            resumed = named_events((await client.get(f"/v1/responses/{created['id']}?stream=true&starting_after={after}")).text)
            assert [e.raw for e in resumed] == [e.raw for e in full[after + 1 :]]


async def test_the_sdk_stream_helper_and_the_object_agree() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        async with sdk(client).responses.stream(model="m", input="hi") as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_response()
        whole = await sdk(client).responses.create(model="m", input="hi")
    assert "response.reasoning_text.delta" in kinds
    for response in (final, whole):
        reasoning, message = response.output
        assert reasoning.type == "reasoning" and reasoning.content is not None
        assert reasoning.content[0].text == "Think hard."
        assert response.output_text == "Hi!"
        assert response.usage is not None and response.usage.output_tokens_details.reasoning_tokens == 2


async def test_reasoning_then_a_call() -> None:
    async with make_client(backend=FakeBackend(plan=thinking_then_calling)) as (client, _):
        whole = (await client.post("/v1/responses", json={"model": "m", "input": "hi"})).json()
        streamed = named_events((await client.post("/v1/responses", json={"model": "m", "input": "hi", "stream": True})).text)
    assert [item["type"] for item in whole["output"]] == ["reasoning", "function_call"]
    assert whole["output"][1]["arguments"] == '{"city": "Paris"}'
    assert [e.data["output_index"] for e in streamed if e.event == "response.output_item.added"] == [0, 1]

    def without_ids(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{k: v for k, v in item.items() if k != "id"} for item in output]

    assert without_ids(streamed[-1].data["response"]["output"]) == without_ids(whole["output"])


async def test_effort_reaches_the_node_and_is_echoed() -> None:
    async with make_client() as (client, backend):
        body = {"model": "m", "input": "hi", "reasoning": {"effort": "low", "summary": "auto"}}
        response = (await client.post("/v1/responses", json=body)).json()
        plain = (await client.post("/v1/responses", json={"model": "m", "input": "hi"})).json()
        bad = await client.post("/v1/responses", json={"model": "m", "input": "hi", "reasoning": {"effort": "huge"}})
    wish = request_reasoning(backend.submitted[0].metadata)
    assert wish is not None and wish.effort == "low"
    assert "reasoning" not in backend.submitted[1].metadata
    assert response["reasoning"] == {"effort": "low", "summary": "auto"}
    assert plain["reasoning"] == {"effort": None, "summary": None}
    assert plain["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "reasoning.effort"


@pytest.mark.parametrize("via_previous", [False, True])
async def test_reasoning_is_not_sent_back_downstream(via_previous: bool) -> None:
    """A reasoning item a client sends back is accepted and left out, and ``previous_response_id`` carries none."""
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, backend):
        first = (await client.post("/v1/responses", json={"model": "m", "input": "hi"})).json()
        follow_up: dict[str, Any] = {"model": "m"}
        if via_previous:
            follow_up |= {"previous_response_id": first["id"], "input": "and?"}
        else:
            follow_up["input"] = [{"role": "user", "content": "hi"}, *first["output"], {"role": "user", "content": "and?"}]
        response = await client.post("/v1/responses", json=follow_up)
    assert response.status_code == 200, response.text
    texts = backend.submitted[1].texts
    assert not any("Think" in text for text in texts)
    assert any(text.endswith("Hi!") for text in texts) and texts[-1].endswith("and?")
