"""/v1/messages (Anthropic Messages API) over the fake backend: shapes, stream events, errors, what reaches the node."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from openai_stream_protocol import (
    Chunk,
    ToolCallDelta,
    encode_tools,
    parse_request_texts,
    request_parallel_tool_calls,
    request_tool_choice,
    request_tools,
    split_tokens,
)
from openai_stream_server.api.dispatch import prompt_tokens
from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend
from tests.live import LiveServer, metric, wait_metric
from tests.unit.conftest import make_client

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
CLOCK = {"name": "get_time", "input_schema": {"type": "object", "properties": {}}}
HELLO = [{"role": "user", "content": "Hello   there,\n general"}]
BASE: dict[str, Any] = {"model": "claude-test", "max_tokens": 64, "messages": HELLO}


def sdk(client: httpx.AsyncClient, api_key: str = "k") -> anthropic.AsyncAnthropic:
    """The anthropic SDK over the same app (it speaks ``httpx2``, so its own ASGI transport)."""
    transport = httpx2.ASGITransport(app=client.app)  # type: ignore[attr-defined]
    http = httpx2.AsyncClient(transport=transport, base_url="http://localhost", timeout=10)
    return anthropic.AsyncAnthropic(base_url="http://localhost", api_key=api_key, http_client=http, max_retries=0)


def two_calls(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
    """Text, a call in two argument pieces, a second call whole, text again, then finish tool_calls."""
    rid = request.request_id
    return [
        Chunk(rid, 0, "Let me "),
        Chunk(rid, 1, "check. "),
        Chunk(rid, 2, '{"city": ', tool_call=ToolCallDelta(0, "call_a1", "get_weather")),
        Chunk(rid, 3, '"Paris"}', tool_call=ToolCallDelta(0)),
        Chunk(rid, 4, "{}", tool_call=ToolCallDelta(1, "call_b2", "get_time")),
        Chunk(rid, 5, "Done."),
        Chunk(rid, 6, "", fin=True, finish_reason="tool_calls", completion_tokens=6),
    ]


def finishing(reason: str) -> FakeBackend:
    def plan(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return [Chunk(rid, 0, "some text"), Chunk(rid, 1, "", fin=True, finish_reason=reason)]

    return FakeBackend(plan=plan)


def events_of(text: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event, data)`` per SSE block; comment lines skipped, every block must name its event."""
    events = []
    for block in text.split("\n\n"):
        lines = [line for line in block.split("\n") if line and not line.startswith(":")]
        if not lines:
            continue
        assert lines[0].startswith("event: ") and lines[1].startswith("data: ") and len(lines) == 2, block
        data = json.loads(lines[1][6:])
        assert data["type"] == lines[0][7:]
        events.append((lines[0][7:], data))
    return events


def is_anthropic_error(response: httpx.Response, status: int, error_type: str) -> str:
    """Assert the Anthropic error shape; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
    assert body["error"]["type"] == error_type
    message: str = body["error"]["message"]
    return message


# -- JSON ----------------------------------------------------------------------


async def test_sdk_create_returns_the_echo_as_a_message() -> None:
    async with make_client() as (client, _):
        message = await sdk(client).messages.create(**BASE)
    assert message.id.startswith("msg_") and len(message.id) == 28
    assert (message.type, message.role, message.model) == ("message", "assistant", "claude-test")
    assert [(b.type, getattr(b, "text", None)) for b in message.content] == [("text", "Hello   there,\n general")]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 3)


async def test_json_body_and_headers() -> None:
    async with make_client() as (client, _):
        r = await client.post("/v1/messages", json=BASE, headers={"anthropic-version": "2023-06-01"})
    body = r.json()
    assert r.status_code == 200
    assert r.headers["request-id"] == r.headers["x-request-id"] == body["id"]
    assert list(body) == ["id", "type", "role", "model", "content", "stop_reason", "stop_sequence", "usage"]
    assert body["usage"] == {
        "input_tokens": 3,
        "output_tokens": 3,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


async def test_an_empty_answer_has_no_content_blocks() -> None:
    async with make_client() as (client, _):
        r = await client.post("/v1/messages", json={**BASE, "messages": [{"role": "user", "content": ""}]})
    assert r.json()["content"] == [] and r.json()["stop_reason"] == "end_turn"


async def test_non_stream_tool_calls_are_tool_use_blocks_in_order() -> None:
    async with make_client(backend=FakeBackend(plan=two_calls)) as (client, _):
        message = await sdk(client).messages.create(**BASE, tools=[WEATHER, CLOCK])  # type: ignore[arg-type]
    assert message.stop_reason == "tool_use"
    assert [b.to_dict() for b in message.content] == [
        {"type": "text", "text": "Let me check. "},
        {"type": "tool_use", "id": "call_a1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b2", "name": "get_time", "input": {}},
        {"type": "text", "text": "Done."},
    ]
    assert message.usage.output_tokens == 6


@pytest.mark.parametrize(("finish", "stop"), [("stop", "end_turn"), ("length", "max_tokens"), ("content_filter", "refusal")])
async def test_stop_reason_from_finish_reason(finish: str, stop: str) -> None:
    async with make_client(backend=finishing(finish)) as (client, _):
        whole = (await client.post("/v1/messages", json=BASE)).json()
        streamed = events_of((await client.post("/v1/messages", json={**BASE, "stream": True})).text)
    assert whole["stop_reason"] == stop
    [ending] = [data for name, data in streamed if name == "message_delta"]
    assert ending["delta"] == {"stop_reason": stop, "stop_sequence": None}


def stopped_by(reason: str, stop_sequence: str) -> FakeBackend:
    """The node cut its answer at ``stop_sequence`` and says so on the finish chunk."""

    def plan(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        fin = Chunk(rid, 1, "", fin=True, finish_reason=reason, stop_sequence=stop_sequence)
        return [Chunk(rid, 0, "one two "), fin]

    return FakeBackend(plan=plan)


async def test_a_stop_sequence_the_node_names_is_stop_reason_stop_sequence() -> None:
    async with make_client(backend=stopped_by("stop", "STOP")) as (client, _):
        api = sdk(client)
        message = await api.messages.create(**BASE, stop_sequences=["STOP"])
        async with api.messages.stream(**BASE, stop_sequences=["STOP"]) as stream:
            final = await stream.get_final_message()
        raw = events_of((await client.post("/v1/messages", json={**BASE, "stream": True})).text)
        whole = (await client.post("/v1/messages", json=BASE)).json()
    for got in (message, final):
        assert (got.stop_reason, got.stop_sequence) == ("stop_sequence", "STOP")
        assert [b.to_dict() for b in got.content] == [{"type": "text", "text": "one two "}]
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("stop_sequence", "STOP")
    [start] = [data for name, data in raw if name == "message_start"]
    assert (start["message"]["stop_reason"], start["message"]["stop_sequence"]) == (None, None)
    [ending] = [data for name, data in raw if name == "message_delta"]
    assert ending["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "STOP"}


async def test_a_stop_sequence_on_another_finish_reason_is_not_reported() -> None:
    async with make_client(backend=stopped_by("length", "STOP")) as (client, _):
        whole = (await client.post("/v1/messages", json=BASE)).json()
        raw = events_of((await client.post("/v1/messages", json={**BASE, "stream": True})).text)
    assert (whole["stop_reason"], whole["stop_sequence"]) == ("max_tokens", None)
    [ending] = [data for name, data in raw if name == "message_delta"]
    assert ending["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}


async def test_chat_completions_still_say_stop_for_a_stop_sequence() -> None:
    async with make_client(backend=stopped_by("stop", "STOP")) as (client, _):
        body = (await client.post("/v1/chat/completions", json={"model": "m", "messages": HELLO, "stop": ["STOP"]})).json()
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["message"]["content"] == "one two "


async def test_max_tokens_cuts_the_echo() -> None:
    async with make_client() as (client, backend):
        message = await sdk(client).messages.create(**{**BASE, "max_tokens": 2})
    assert message.stop_reason == "max_tokens" and message.content[0].to_dict()["text"] == "Hello   there,"
    assert backend.submitted[0].metadata["max_tokens"] == 2


async def test_arguments_that_are_not_an_object_give_an_empty_input() -> None:
    def bad_json(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return [
            Chunk(rid, 0, '{"city": ', tool_call=ToolCallDelta(0, "call_x", "get_weather")),
            Chunk(rid, 1, "[1, 2]", tool_call=ToolCallDelta(1, "call_y", "get_weather")),
            Chunk(rid, 2, "", fin=True, finish_reason="tool_calls"),
        ]

    async with make_client(backend=FakeBackend(plan=bad_json)) as (client, _):
        body = (await client.post("/v1/messages", json={**BASE, "tools": [WEATHER]})).json()
    assert [block["input"] for block in body["content"]] == [{}, {}]


# -- stream --------------------------------------------------------------------


async def test_stream_event_order_and_block_indexes() -> None:
    async with make_client(backend=FakeBackend(plan=two_calls)) as (client, _):
        r = await client.post("/v1/messages", json={**BASE, "stream": True, "tools": [WEATHER, CLOCK]})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in r.text
    events = events_of(r.text)
    shape = [(name, data.get("index")) for name, data in events]
    # a delta event per run: the fake's pieces may coalesce, so collapse repeated deltas
    collapsed = [item for i, item in enumerate(shape) if i == 0 or item != shape[i - 1] or item[0] != "content_block_delta"]
    assert collapsed == [
        ("message_start", None),
        ("ping", None),
        ("content_block_start", 0),
        ("content_block_delta", 0),
        ("content_block_stop", 0),
        ("content_block_start", 1),
        ("content_block_delta", 1),
        ("content_block_stop", 1),
        ("content_block_start", 2),
        ("content_block_delta", 2),
        ("content_block_stop", 2),
        ("content_block_start", 3),
        ("content_block_delta", 3),
        ("content_block_stop", 3),
        ("message_delta", None),
        ("message_stop", None),
    ]
    data = dict(events)  # the last of each name
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None and start["id"] == r.headers["request-id"]
    starts = [d["content_block"] for name, d in events if name == "content_block_start"]
    assert starts == [
        {"type": "text", "text": ""},
        {"type": "tool_use", "id": "call_a1", "name": "get_weather", "input": {}},
        {"type": "tool_use", "id": "call_b2", "name": "get_time", "input": {}},
        {"type": "text", "text": ""},
    ]
    deltas: dict[int, str] = {}
    for name, d in events:
        if name == "content_block_delta":
            delta = d["delta"]
            deltas[d["index"]] = deltas.get(d["index"], "") + (delta.get("text") or delta.get("partial_json") or "")
            assert delta["type"] == ("input_json_delta" if d["index"] in (1, 2) else "text_delta")
    assert deltas == {0: "Let me check. ", 1: '{"city": "Paris"}', 2: "{}", 3: "Done."}
    assert data["message_delta"]["delta"]["stop_reason"] == "tool_use"
    assert data["message_delta"]["usage"]["output_tokens"] == 6


async def test_sdk_stream_accumulates_text_and_tool_use() -> None:
    async with make_client(backend=FakeBackend(plan=two_calls)) as (client, _):
        async with sdk(client).messages.stream(**BASE, tools=[WEATHER, CLOCK]) as stream:  # type: ignore[arg-type]
            texts = [text async for text in stream.text_stream]
            final = await stream.get_final_message()
    assert "".join(texts) == "Let me check. Done."
    assert [b.to_dict() for b in final.content] == [
        {"type": "text", "text": "Let me check. "},
        {"type": "tool_use", "id": "call_a1", "name": "get_weather", "input": {"city": "Paris"}},
        {"type": "tool_use", "id": "call_b2", "name": "get_time", "input": {}},
        {"type": "text", "text": "Done."},
    ]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 6


async def test_sdk_stream_of_plain_text() -> None:
    async with make_client() as (client, _):
        async with sdk(client).messages.stream(**BASE) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_message()
    assert final.content[0].to_dict() == {"type": "text", "text": "Hello   there,\n general"}
    assert final.stop_reason == "end_turn" and final.usage.input_tokens == 3 and final.usage.output_tokens == 3
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop" and "content_block_stop" in kinds


async def test_keep_alive_comments_are_ignored_by_the_sdk() -> None:
    backend = FakeBackend(delay_s=0.05)
    async with make_client(Settings(sweep_interval_s=0.02, ping_interval_s=0.01), backend) as (client, _):
        raw = await client.post("/v1/messages", json={**BASE, "stream": True})
        async with sdk(client).messages.stream(**BASE) as stream:
            final = await stream.get_final_message()
    assert ": ping\n" in raw.text  # the comment pings were there to be skipped
    assert final.content[0].to_dict()["text"] == "Hello   there,\n general"


async def test_a_failure_after_the_headers_is_an_error_event() -> None:
    def fails(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return [Chunk(rid, 0, "partial"), Chunk(rid, 1, "", fin=True, finish_reason="error", error="boom")]

    async with make_client(backend=FakeBackend(plan=fails)) as (client, _):
        r = await client.post("/v1/messages", json={**BASE, "stream": True})
        with pytest.raises(anthropic.APIStatusError) as raised:
            async with sdk(client).messages.stream(**BASE) as stream:
                async for _ in stream:
                    pass
    events = events_of(r.text)
    assert r.status_code == 200 and events[-1][0] == "error"
    assert events[-1][1] == {"type": "error", "error": {"type": "api_error", "message": "boom"}}
    assert "message_stop" not in [name for name, _ in events]
    assert "boom" in str(raised.value)


async def test_client_gone_cancels_downstream() -> None:
    backend = FakeBackend(delay_s=0.02)
    long_prompt = " ".join(f"w{i}" for i in range(400))
    with LiveServer(create_app(Settings(sweep_interval_s=0.02), backend)) as server:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
            body = {**BASE, "stream": True, "messages": [{"role": "user", "content": long_prompt}]}
            async with client.stream("POST", "/v1/messages", json=body) as r:
                assert r.status_code == 200
                lines = r.aiter_lines()
                seen = [line async for line in _take(lines, "content_block_delta", 2)]
                message_id = r.headers["request-id"]
            assert await wait_metric(client, "oss_active_streams", 0) == 0
            metrics = (await client.get("/metrics")).text
    assert seen.count("event: content_block_delta") == 2
    assert backend.cancelled == [message_id]
    assert metric(metrics, 'oss_completions_total{status="cancelled",surface="messages"}') == 1


async def _take(lines: AsyncIterator[str], event: str, count: int) -> AsyncIterator[str]:
    seen = 0
    async for line in lines:
        yield line
        seen += line == f"event: {event}"
        if seen >= count:
            return


# -- what reaches the node -----------------------------------------------------


async def test_the_conversation_reaches_the_node_as_parts() -> None:
    messages: list[dict[str, Any]] = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Look:"},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_a1", "name": "get_weather", "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "toolu_01", "name": "get_time", "input": {}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "call_a1", "content": "21 C"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_01",
                    "content": [{"type": "text", "text": "noon"}],
                    "is_error": False,
                },
                {"type": "text", "text": "Thanks"},
            ],
        },
    ]
    body = {**BASE, "system": [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Be kind."}], "messages": messages}
    async with make_client() as (client, backend):
        r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    parts = parse_request_texts(backend.submitted[0].texts)
    assert [(p.role, p.kind, p.content if p.kind != "tool_calls" else None, p.tool_call_id) for p in parts] == [
        ("system", "text", "Be brief.", None),
        ("system", "text", "Be kind.", None),
        ("user", "text", "Look:", None),
        ("user", "image", "data:image/png;base64,iVBORw0KGgo=", None),
        ("user", "image", "https://example.com/cat.jpg", None),
        ("assistant", "text", "Checking.", None),
        ("assistant", "tool_calls", None, None),
        ("tool", "text", "21 C", "call_a1"),
        ("tool", "text", "noon", "toolu_01"),
        ("user", "text", "Thanks", None),
    ]
    calls = parts[6].calls()
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("call_a1", "get_weather", {"city": "Paris"}),
        ("toolu_01", "get_time", {}),
    ]


async def test_a_string_system_and_the_sampling_options_reach_the_node() -> None:
    body = {
        **BASE,
        "system": "Be brief.",
        "stop_sequences": ["END", "STOP"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "metadata": {"user_id": "u-1"},
    }
    async with make_client() as (client, backend):
        r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    request = backend.submitted[0]
    assert [(p.role, p.content) for p in parse_request_texts(request.texts)] == [
        ("system", "Be brief."),
        ("user", "Hello   there,\n general"),
    ]
    meta = request.metadata
    assert (meta["stop"], meta["temperature"], meta["top_p"], meta["max_tokens"]) == (["END", "STOP"], 0.5, 0.9, 64)
    assert meta["model"] == "claude-test" and meta["stream"] is False and meta["request_id"] == r.json()["id"]
    assert "top_k" not in meta and "tools" not in meta and "tool_choice" not in meta


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        (None, None),
        ({"type": "auto"}, "auto"),
        ({"type": "any"}, "required"),
        ({"type": "none"}, "none"),
        ({"type": "tool", "name": "get_time"}, {"type": "function", "function": {"name": "get_time"}}),
    ],
)
async def test_tools_and_tool_choice_reach_the_node_in_the_chat_wire_form(choice: dict[str, Any] | None, expected: Any) -> None:
    body: dict[str, Any] = {**BASE, "tools": [WEATHER, {**CLOCK, "type": "custom"}]}
    if choice is not None:
        body["tool_choice"] = choice
    async with make_client() as (client, backend):
        r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200, r.text
    meta = backend.submitted[0].metadata
    assert request_tools(meta) == [
        {
            "type": "function",
            "function": {"name": "get_weather", "description": "The weather in a city", "parameters": WEATHER["input_schema"]},
        },
        {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert request_tool_choice(meta) == expected
    assert "parallel_tool_calls" not in meta


async def test_disable_parallel_tool_use_asks_for_one_call() -> None:
    body = {**BASE, "tools": [WEATHER], "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    async with make_client() as (client, backend):
        r = await client.post("/v1/messages", json=body)
    assert r.status_code == 200 and request_parallel_tool_calls(backend.submitted[0].metadata) is False


# -- bad input -----------------------------------------------------------------


def _with_content(*blocks: dict[str, Any], role: str = "user") -> dict[str, Any]:
    return {**BASE, "messages": [{"role": role, "content": list(blocks)}]}


TEXT = {"type": "text", "text": "hi"}

BAD: list[tuple[dict[str, Any], str]] = [
    ({k: v for k, v in BASE.items() if k != "max_tokens"}, "max_tokens"),
    ({**BASE, "max_tokens": 0}, "max_tokens"),
    ({**BASE, "max_tokens": "5"}, "max_tokens"),
    ({k: v for k, v in BASE.items() if k != "model"}, "model"),
    ({**BASE, "messages": []}, "messages"),
    ({**BASE, "messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
    ({**BASE, "messages": [{"role": "user"}]}, "messages.0.content"),
    (_with_content(TEXT, {"type": "video"}), "messages.0.content.1.type"),
    (_with_content({"type": "text"}), "messages.0.content.0.text"),
    (_with_content({"type": "image"}), "messages.0.content.0.source"),
    (_with_content({"type": "image", "source": {"type": "base64", "data": "x"}}), "messages.0.content.0.source.media_type"),
    (
        _with_content({"type": "image", "source": {"type": "base64", "media_type": "image/tiff", "data": "x"}}),
        "messages.0.content.0.source.media_type",
    ),
    (_with_content({"type": "image", "source": {"type": "url"}}), "messages.0.content.0.source.url"),
    (_with_content({"type": "tool_use", "id": "call_1", "name": "f", "input": {}}), "messages.0.content.0.type"),
    (_with_content({"type": "tool_result", "tool_use_id": "call_1"}, role="assistant"), "messages.0.content.0.type"),
    (_with_content({"type": "image", "source": {"type": "url", "url": "u"}}, role="assistant"), "messages.0.content.0.type"),
    (
        _with_content({"type": "tool_use", "id": "call_1", "name": "f", "input": "{}"}, role="assistant"),
        "messages.0.content.0.input",
    ),
    (_with_content({"type": "tool_use", "id": "bad id", "name": "f", "input": {}}, role="assistant"), "messages.0.content.0.id"),
    (_with_content({"type": "tool_use", "id": "call_1", "input": {}}, role="assistant"), "messages.0.content.0.name"),
    (_with_content({"type": "tool_result"}), "messages.0.content.0.tool_use_id"),
    (
        _with_content({"type": "tool_result", "tool_use_id": "c", "content": [{"type": "image"}]}),
        "messages.0.content.0.content.0.type",
    ),
    ({**BASE, "system": [{"type": "text", "text": 1}]}, "system.0.text"),
    ({**BASE, "tools": [{"name": "bad name", "input_schema": {}}]}, "tools.0.name"),
    ({**BASE, "tools": [{"name": "f"}]}, "tools.0.input_schema"),
    ({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools.0.type"),
    ({**BASE, "tools": [WEATHER], "tool_choice": {"type": "tool"}}, "tool_choice.name"),
    ({**BASE, "tools": [WEATHER], "tool_choice": {"type": "tool", "name": "nope"}}, "tool_choice.name"),
    ({**BASE, "tool_choice": {"type": "any"}}, "tool_choice.type"),
    ({**BASE, "tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ({**BASE, "temperature": 1.5}, "temperature"),
    ({**BASE, "top_p": -0.1}, "top_p"),
    ({**BASE, "stop_sequences": "END"}, "stop_sequences"),
    ({**BASE, "stream": "yes"}, "stream"),
    ({**BASE, "metadata": {"user_id": 5}}, "metadata.user_id"),
]


@pytest.mark.parametrize(("body", "field"), BAD, ids=[f"{i}-{field}" for i, (_, field) in enumerate(BAD)])
async def test_bad_input_is_an_anthropic_error_naming_the_field(body: dict[str, Any], field: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/messages", json=body)
    message = is_anthropic_error(r, 400, "invalid_request_error")
    assert message.startswith(field + ": "), message
    assert backend.submitted == []


async def test_bad_input_raises_bad_request_in_the_sdk() -> None:
    async with make_client() as (client, _):
        with pytest.raises(anthropic.BadRequestError) as raised:
            await sdk(client).messages.create(model="m", max_tokens=0, messages=HELLO)  # type: ignore[arg-type]
    assert raised.value.status_code == 400 and "max_tokens: " in raised.value.message


async def test_a_body_that_is_not_json() -> None:
    async with make_client() as (client, _):
        r = await client.post("/v1/messages", content=b"{not json", headers={"content-type": "application/json"})
    assert "not a valid JSON object" in is_anthropic_error(r, 400, "invalid_request_error")


# -- errors before the headers -------------------------------------------------


async def test_an_unknown_model_is_not_found() -> None:
    async with make_client(Settings(models=("claude-test",))) as (client, _):
        r = await client.post("/v1/messages", json={**BASE, "model": "other"})
        with pytest.raises(anthropic.NotFoundError):
            await sdk(client).messages.create(**{**BASE, "model": "other"})
    assert is_anthropic_error(r, 404, "not_found_error").startswith("model: ")


async def test_a_refused_submit_is_overloaded_before_the_headers() -> None:
    async with make_client(backend=FakeBackend(fail_submit=True)) as (client, _):
        plain = await client.post("/v1/messages", json=BASE)
        streamed = await client.post("/v1/messages", json={**BASE, "stream": True})
    for r in (plain, streamed):
        assert is_anthropic_error(r, 503, "overloaded_error") == "fake backend refuses"
        assert r.headers["request-id"].startswith("msg_")


async def test_a_silent_node_times_out_before_the_headers() -> None:
    settings = Settings(sweep_interval_s=0.02, first_chunk_timeout_s=0.1, header_grace_s=5)
    async with make_client(settings, FakeBackend(silent=True)) as (client, backend):
        r = await client.post("/v1/messages", json={**BASE, "stream": True})
        with pytest.raises(anthropic.APIStatusError) as raised:
            await sdk(client).messages.create(**BASE)
    is_anthropic_error(r, 504, "timeout_error")
    assert raised.value.status_code == 504
    assert len(backend.cancelled) == 2


async def test_a_body_too_large_is_request_too_large() -> None:
    async with make_client(Settings(max_body_bytes=100)) as (client, _):
        r = await client.post("/v1/messages", json={**BASE, "system": "x" * 200})
    is_anthropic_error(r, 413, "request_too_large")


async def test_other_methods_and_paths_are_anthropic_shaped() -> None:
    async with make_client() as (client, _):
        get = await client.get("/v1/messages")
        get_count = await client.get("/v1/messages/count_tokens")
        unknown = await client.post("/v1/messages/batches", json={})
    assert get.headers["allow"] == "POST"
    is_anthropic_error(get, 405, "invalid_request_error")
    is_anthropic_error(get_count, 405, "invalid_request_error")
    is_anthropic_error(unknown, 404, "not_found_error")


# -- count_tokens ----------------------------------------------------------------


async def test_count_tokens_is_the_server_estimate() -> None:
    body: dict[str, Any] = {"model": "m", "system": "Be brief.", "messages": HELLO}
    async with make_client() as (client, backend):
        plain = await client.post("/v1/messages/count_tokens", json=body)
        with_tools = await client.post("/v1/messages/count_tokens", json={**body, "tools": [WEATHER]})
        counted = await sdk(client).messages.count_tokens(model="m", messages=HELLO)  # type: ignore[arg-type]
        sent = await client.post("/v1/messages", json={**BASE, "system": "Be brief."})
    assert plain.status_code == 200 and plain.json() == {"input_tokens": 5}  # "Be brief." 2 + the greeting 3
    assert prompt_tokens(parse_request_texts(backend.submitted[0].texts)) == 5 == sent.json()["usage"]["input_tokens"]
    function = {"name": "get_weather", "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}
    tools_json = encode_tools([{"type": "function", "function": function}])["tools"]
    assert with_tools.json()["input_tokens"] == 5 + len(split_tokens(tools_json))  # the tools' JSON (wire form) counts too
    assert counted.input_tokens == 3
    assert len(backend.submitted) == 1  # counting sends nothing downstream


async def test_count_tokens_refuses_bad_input() -> None:
    async with make_client() as (client, _):
        missing = await client.post("/v1/messages/count_tokens", json={"model": "m"})
        choice = await client.post(
            "/v1/messages/count_tokens", json={"model": "m", "messages": HELLO, "tool_choice": {"type": "tool", "name": "x"}}
        )
    assert is_anthropic_error(missing, 400, "invalid_request_error").startswith("messages: ")
    assert is_anthropic_error(choice, 400, "invalid_request_error").startswith("tool_choice.name: ")


# -- auth and the guard ------------------------------------------------------------


@asynccontextmanager
async def keyed() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(Settings(sweep_interval_s=0.02, api_key="sekret")) as (client, _):
        yield client


async def test_x_api_key_or_bearer_is_accepted() -> None:
    async with keyed() as client:
        by_header = await client.post("/v1/messages", json=BASE, headers={"x-api-key": "sekret"})
        by_bearer = await client.post("/v1/messages", json=BASE, headers={"authorization": "Bearer sekret"})
        message = await sdk(client, api_key="sekret").messages.create(**BASE)
        chat = await client.post("/v1/chat/completions", json={"messages": HELLO}, headers={"x-api-key": "sekret"})
    assert by_header.status_code == by_bearer.status_code == chat.status_code == 200
    assert message.content[0].to_dict()["text"] == "Hello   there,\n general"


async def test_a_missing_or_wrong_key_is_an_authentication_error() -> None:
    async with keyed() as client:
        missing = await client.post("/v1/messages", json=BASE)
        wrong = await client.post("/v1/messages/count_tokens", json=BASE, headers={"x-api-key": "sekre"})
        with pytest.raises(anthropic.AuthenticationError):
            await sdk(client, api_key="nope").messages.create(**BASE)
        chat = await client.post("/v1/chat/completions", json={"messages": HELLO}, headers={"x-api-key": "nope"})
    assert "x-api-key" in is_anthropic_error(missing, 401, "authentication_error")
    is_anthropic_error(wrong, 401, "authentication_error")
    assert chat.status_code == 401 and chat.json()["error"]["code"] == "invalid_api_key"  # OpenAI's shape elsewhere


async def test_the_guard_answers_in_anthropic_shape() -> None:
    async with make_client() as (client, _):
        form = await client.post("/v1/messages", content=b"{}", headers={"content-type": "text/plain"})
        page = await client.post("/v1/messages", json=BASE, headers={"origin": "https://evil.example"})
        host = await client.post("/v1/messages", json=BASE, headers={"host": "evil.example"})
    assert "Content-Type" in is_anthropic_error(form, 415, "invalid_request_error")
    assert is_anthropic_error(page, 403, "permission_error").startswith("Origin: ")
    is_anthropic_error(host, 421, "invalid_request_error")


async def test_requests_are_counted_under_the_messages_surface() -> None:
    async with make_client() as (client, _):
        await client.post("/v1/messages", json=BASE)
        await client.post("/v1/messages", json={**BASE, "max_tokens": 0})
        await asyncio.sleep(0)
        text = (await client.get("/metrics")).text
    assert metric(text, 'oss_requests_total{status="200",surface="messages"}') == 1
    assert metric(text, 'oss_requests_total{status="400",surface="messages"}') == 1
