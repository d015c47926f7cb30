"""Reasoning on /v1/messages: thinking blocks before the text, thinking_delta then signature_delta, the thinking parameter."""

from __future__ import annotations

import json
from typing import Any

import pytest

from openai_stream_protocol import Chunk, ToolCallDelta, request_reasoning
from openai_stream_server.api.messages.render import signature
from openai_stream_server.backend import DownstreamRequest
from tests.fakes import FakeBackend
from tests.unit.conftest import make_client
from tests.unit.test_messages import BASE, sdk


def thinking(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    rid = request.request_id
    return [
        Chunk(rid, 0, "", reasoning=True),
        Chunk(rid, 1, "Weather, ", reasoning=True),
        Chunk(rid, 2, "then answer.", reasoning=True),
        Chunk(rid, 3, "Checking."),
        Chunk(rid, 4, '{"city": "Paris"}', tool_call=ToolCallDelta(0, "call_w", "get_weather")),
        Chunk(rid, 5, "", fin=True, finish_reason="tool_calls", completion_tokens=9, reasoning_tokens=4),
    ]


def named(body: str) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for block in body.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if lines:
            out.append((lines[0].removeprefix("event: "), json.loads(lines[1].removeprefix("data: "))))
    return out


async def test_the_stream_opens_a_thinking_block_first_and_signs_it_before_its_stop() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        body = (await client.post("/v1/messages", json={**BASE, "stream": True})).text
    blocks = [(name, data) for name, data in named(body) if name.startswith("content_block")]
    shape = [(name, data["index"], (data.get("delta") or data.get("content_block") or {}).get("type")) for name, data in blocks]
    collapsed = [entry for i, entry in enumerate(shape) if i == 0 or entry != shape[i - 1]]  # coalescing may split deltas
    assert collapsed == [
        ("content_block_start", 0, "thinking"),
        ("content_block_delta", 0, "thinking_delta"),
        ("content_block_delta", 0, "signature_delta"),
        ("content_block_stop", 0, None),
        ("content_block_start", 1, "text"),
        ("content_block_delta", 1, "text_delta"),
        ("content_block_stop", 1, None),
        ("content_block_start", 2, "tool_use"),
        ("content_block_delta", 2, "input_json_delta"),
        ("content_block_stop", 2, None),
    ]
    assert all(d["delta"]["thinking"] for n, d in blocks if n == "content_block_delta" and d["delta"]["type"] == "thinking_delta")
    assert "".join(d["delta"].get("thinking", "") for n, d in blocks if n == "content_block_delta") == "Weather, then answer."


async def test_the_sdk_assembles_the_same_message_streamed_and_whole() -> None:
    async with make_client(backend=FakeBackend(plan=thinking)) as (client, _):
        async with sdk(client).messages.stream(**BASE) as stream:
            streamed = await stream.get_final_message()
        whole = await sdk(client).messages.create(**BASE)
    for message in (streamed, whole):
        assert [block.type for block in message.content] == ["thinking", "text", "tool_use"]
        thought = message.content[0]
        assert thought.type == "thinking" and thought.thinking == "Weather, then answer." and thought.signature
        assert message.content[2].input == {"city": "Paris"}  # type: ignore[union-attr]
        assert message.stop_reason == "tool_use" and message.usage.output_tokens == 9
        assert thought.signature == signature(message.id, 0)  # the stream and the object agree


@pytest.mark.parametrize(
    "thinking_param, expected",
    [
        ({"type": "enabled", "budget_tokens": 1024}, {"budget_tokens": 1024}),
        ({"type": "disabled"}, {"effort": "none"}),
        ({"type": "adaptive", "display": "summarized"}, {}),
    ],
)
async def test_the_thinking_parameter_reaches_the_node(thinking_param: dict[str, Any], expected: dict[str, Any]) -> None:
    async with make_client() as (client, backend):
        response = await client.post("/v1/messages", json={**BASE, "max_tokens": 2048, "thinking": thinking_param})
        counted = await client.post("/v1/messages/count_tokens", json={**BASE, "thinking": thinking_param})
    assert response.status_code == 200 and counted.status_code == 200
    wish = request_reasoning(backend.submitted[0].metadata)
    assert wish is not None
    assert {k: v for k, v in (("effort", wish.effort), ("budget_tokens", wish.budget_tokens)) if v is not None} == expected


@pytest.mark.parametrize(
    "thinking_param, message",
    [
        ({"type": "enabled"}, "thinking.budget_tokens"),
        ({"type": "enabled", "budget_tokens": 100}, "thinking.budget_tokens"),
        ({"type": "enabled", "budget_tokens": 4096}, "thinking.budget_tokens: must be less than max_tokens"),
        ({"type": "sometimes"}, "thinking.type"),
    ],
)
async def test_a_bad_thinking_parameter_is_named(thinking_param: dict[str, Any], message: str) -> None:
    async with make_client() as (client, _):
        response = await client.post("/v1/messages", json={**BASE, "max_tokens": 2048, "thinking": thinking_param})
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith(message)


async def test_thinking_blocks_sent_back_are_left_out() -> None:
    turn = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "secret plan", "signature": "sig"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "call_w", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "call_w", "content": "21 C"}]},
    ]
    async with make_client() as (client, backend):
        response = await client.post("/v1/messages", json={**BASE, "messages": turn})
    assert response.status_code == 200, response.text
    texts = backend.submitted[0].texts
    assert not any("secret plan" in text or "opaque" in text for text in texts)
    assert any("get_weather" in text for text in texts) and texts[-1].endswith("21 C")
