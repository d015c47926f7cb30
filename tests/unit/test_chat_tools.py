"""Tool calls on /v1/chat/completions: request validation, what reaches the node, and the rendered calls."""

from __future__ import annotations

import json
from typing import Any

import httpx
import openai
import pytest

from openai_stream_protocol import Chunk, ToolCallDelta, parse_request_texts, request_tool_choice, request_tools
from openai_stream_server.backend import DownstreamRequest
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
USER = [{"role": "user", "content": "What is the weather in Paris, and the time?"}]


def two_calls(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    """Some text, a call in two argument pieces, a second call whole in one chunk, then finish tool_calls."""
    rid = request.request_id
    return [
        Chunk(rid, 0, "Let me check. "),
        Chunk(rid, 1, '{"city": ', tool_call=ToolCallDelta(0, "call_a1", "get_weather")),
        Chunk(rid, 2, '"Paris"}', tool_call=ToolCallDelta(0)),
        Chunk(rid, 3, "{}", tool_call=ToolCallDelta(1, "call_b2", "get_time")),
        Chunk(rid, 4, "", fin=True, finish_reason="tool_calls"),
    ]


def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)


async def test_streamed_tool_calls_accumulate_in_the_sdk() -> None:
    async with make_client(backend=FakeBackend(plan=two_calls)) as (client, _):
        stream = await sdk(client).chat.completions.create(
            model="m",
            messages=USER,
            tools=[WEATHER, CLOCK],
            stream=True,  # type: ignore[list-item]
        )
        content, calls, reasons = "", {}, []
        async for chunk in stream:
            choice = chunk.choices[0]
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or ():
                call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
                if delta.id:
                    assert call["id"] is None, "a call's id comes once"
                    call["id"] = delta.id
                    assert delta.type == "function"
                assert delta.function is not None
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            reasons.append(choice.finish_reason)
    assert content == "Let me check. "
    assert calls == {
        0: {"id": "call_a1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        1: {"id": "call_b2", "name": "get_time", "arguments": "{}"},
    }
    assert json.loads(calls[0]["arguments"]) == {"city": "Paris"}
    assert reasons[-1] == "tool_calls" and reasons.count("tool_calls") == 1


async def test_non_stream_message_carries_the_tool_calls() -> None:
    async with make_client(backend=FakeBackend(plan=two_calls)) as (client, _):
        completion = await sdk(client).chat.completions.create(model="m", messages=USER, tools=[WEATHER, CLOCK])  # type: ignore[list-item]
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check. "
    assert [(c.id, c.type, c.function.name, c.function.arguments) for c in choice.message.tool_calls or ()] == [
        ("call_a1", "function", "get_weather", '{"city": "Paris"}'),
        ("call_b2", "function", "get_time", "{}"),
    ]


async def test_a_call_alone_has_null_content() -> None:
    def one_call(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return [
            Chunk(rid, 0, '{"city": "Oslo"}', tool_call=ToolCallDelta(0, "call_x", "get_weather")),
            Chunk(rid, 1, "", fin=True, finish_reason="tool_calls"),
        ]

    async with make_client(backend=FakeBackend(plan=one_call)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER]})
    message = r.json()["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"] == [
        {"id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    ]


async def test_reattach_stream_numbers_tool_call_events_by_their_last_piece() -> None:
    async with make_client(backend=FakeBackend(plan=two_calls)) as (client, _):
        r = await client.post("/v1/chat/completions", json={"messages": USER, "tools": [WEATHER, CLOCK]})
        request_id = r.json()["id"]
        again = await client.get(f"/v1/chat/completions/{request_id}/stream")
        rest = await client.get(f"/v1/chat/completions/{request_id}/stream?starting_after=1")
    ids = [line[4:] for line in again.text.split("\n") if line.startswith("id: ")]
    assert ids == ["0", "2", "3", "5"]  # text, call 0 (pieces 1-2), call 1, finish
    data = [json.loads(line[6:]) for line in rest.text.split("\n") if line.startswith("data: {")]
    first = data[0]["choices"][0]["delta"]["tool_calls"][0]
    assert first == {"index": 0, "function": {"arguments": '"Paris"}'}}  # resumed mid-call: no id, no name


async def test_tools_and_the_conversation_reach_the_node() -> None:
    messages: list[dict[str, Any]] = [
        *USER,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_a1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_a1", "content": "21 C and sunny"},
    ]
    body = {
        "messages": messages,
        "tools": [WEATHER, CLOCK],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False,
    }
    async with make_client() as (client, backend):
        r = await client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    request = backend.submitted[0]
    assert [tool["function"]["name"] for tool in request_tools(request.metadata)] == ["get_weather", "get_time"]
    assert request_tool_choice(request.metadata) == {"type": "function", "function": {"name": "get_weather"}}
    assert request.metadata["parallel_tool_calls"] is False
    parts = parse_request_texts(request.texts)
    assert [(p.role, p.kind) for p in parts] == [("user", "text"), ("assistant", "tool_calls"), ("tool", "text")]
    [call] = parts[1].calls()
    assert (call.id, call.name, call.arguments) == ("call_a1", "get_weather", '{"city":"Paris"}')
    assert (parts[2].tool_call_id, parts[2].content) == ("call_a1", "21 C and sunny")


async def test_without_tools_no_tool_metadata_goes_downstream() -> None:
    async with make_client() as (client, backend):
        await client.post("/v1/chat/completions", json={"messages": USER, "tool_choice": "auto"})
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & backend.submitted[0].metadata.keys()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"tools": WEATHER}, "tools"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": [1]}}]}, "tools[0].function.parameters"),
        ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
        ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
        ({"messages": [*USER, {"role": "tool", "content": "21 C"}]}, "messages[1]"),
        ({"messages": [*USER, {"role": "user", "content": "x", "tool_calls": []}]}, "messages[1]"),
        (
            {"messages": [*USER, {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {}}]}]},
            "messages[1].tool_calls[0].function.name",
        ),
    ],
)
async def test_invalid_tools_are_refused_naming_the_field(change: dict[str, Any], param: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/chat/completions", json={"messages": USER, **change})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert backend.submitted == []
