"""Tool calls on /v1/responses: function_call output items and their events, resume, validation, input items."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import openai
import pydantic
import pytest
from openai.types.responses import Response as SdkResponse
from openai.types.responses import ResponseStreamEvent

from openai_stream_protocol import Chunk, ToolCallDelta, parse_request_texts, request_tool_choice, request_tools
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.backend import DownstreamRequest
from tests.fakes import FakeBackend, Plan
from tests.unit.conftest import make_client
from tests.unit.test_responses import Named, named_events

STREAM_EVENT = pydantic.TypeAdapter(ResponseStreamEvent)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    "strict": True,
}
CLOCK = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}
ASK = "What is the weather in Paris, and the time?"

MESSAGE_OPEN = ["response.output_item.added", "response.content_part.added"]
MESSAGE_CLOSE = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
CALL_CLOSE = ["response.function_call_arguments.done", "response.output_item.done"]
ADDED = "response.output_item.added"
TEXT_DELTA = "response.output_text.delta"
ARGS_DELTA = "response.function_call_arguments.delta"


def planned(*pieces: tuple[str, ToolCallDelta | None], finish: str = "tool_calls") -> Plan:
    """A plan answering with ``pieces`` (text, and the call it belongs to or None for answer text), then an empty
    ``fin`` chunk."""

    def plan(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        out = [Chunk(rid, i, text, tool_call=call) for i, (text, call) in enumerate(pieces)]
        return [*out, Chunk(rid, len(pieces), "", fin=True, finish_reason=finish)]

    return plan


TEXT_AND_TWO_CALLS = planned(
    ("Let me ", None),
    ("check. ", None),
    ('{"city": ', ToolCallDelta(0, "call_a1", "get_weather")),
    ('"Paris"}', ToolCallDelta(0)),
    ("{}", ToolCallDelta(1, "call_b2", "get_time")),
)
A_CALL_ALONE = planned(
    ('{"city":', ToolCallDelta(0, "call_x", "get_weather")),
    (' "Oslo"', ToolCallDelta(0)),
    ("}", ToolCallDelta(0)),
)
A_WHOLE_CALL = planned(('{"city": "Lima"}', ToolCallDelta(0, "call_w", "get_weather")))


def sdk(client: httpx.AsyncClient) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url="http://localhost/v1", api_key="unused", http_client=client, max_retries=0)


def check_numbered(events: list[Named]) -> None:
    """Names match types, numbers run 0.., and every event parses as the SDK's own (validating) model (but
    ``response.failed``: its ``error.code`` is the server's own, such as ``upstream_error``, not one of the SDK's)."""
    assert [e.event for e in events] == [e.data["type"] for e in events]
    assert [e.data["sequence_number"] for e in events] == list(range(len(events)))
    for e in events:
        if e.event != "response.failed":
            STREAM_EVENT.validate_python(e.data)


def hex_of(response_id: str) -> str:
    return response_id.removeprefix("resp_")


async def test_text_then_two_calls_stream_as_items_in_order() -> None:
    async with make_client(backend=FakeBackend(plan=TEXT_AND_TWO_CALLS)) as (client, backend):
        r = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER, CLOCK], "stream": True})
    assert r.status_code == 200, r.text
    events = named_events(r.text)
    check_numbered(events)
    assert [e.event for e in events] == [
        "response.created",
        "response.in_progress",
        *MESSAGE_OPEN,
        TEXT_DELTA,
        TEXT_DELTA,
        *MESSAGE_CLOSE,
        ADDED,
        ARGS_DELTA,
        ARGS_DELTA,
        *CALL_CLOSE,
        ADDED,
        ARGS_DELTA,
        *CALL_CLOSE,
        "response.completed",
    ]
    h = hex_of(r.headers["x-request-id"])
    message, first, second = (e.data["item"] for e in events if e.event == ADDED)
    assert message == {"id": f"msg_{h}", "type": "message", "status": "in_progress", "role": "assistant", "content": []}
    assert first == {
        "type": "function_call",
        "id": f"fc_{h}_0",
        "call_id": "call_a1",
        "name": "get_weather",
        "arguments": "",
        "status": "in_progress",
    }
    assert (second["id"], second["call_id"], second["name"]) == (f"fc_{h}_1", "call_b2", "get_time")
    assert [e.data["output_index"] for e in events if e.event == ADDED] == [0, 1, 2]
    args = [(e.data["item_id"], e.data["output_index"], e.data["delta"]) for e in events if e.event == ARGS_DELTA]
    assert args == [(f"fc_{h}_0", 1, '{"city": '), (f"fc_{h}_0", 1, '"Paris"}'), (f"fc_{h}_1", 2, "{}")]
    done = [e.data for e in events if e.event == "response.function_call_arguments.done"]
    assert [(d["item_id"], d["name"], d["arguments"]) for d in done] == [
        (f"fc_{h}_0", "get_weather", '{"city": "Paris"}'),
        (f"fc_{h}_1", "get_time", "{}"),
    ]
    final = SdkResponse.model_validate(events[-1].data["response"])
    assert final.status == "completed" and final.output_text == "Let me check. "
    assert [item.type for item in final.output] == ["message", "function_call", "function_call"]
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments, c.status) for c in calls] == [
        ("call_a1", "get_weather", '{"city": "Paris"}', "completed"),
        ("call_b2", "get_time", "{}", "completed"),
    ]
    item_done = [e.data["item"] for e in events if e.event == "response.output_item.done"]
    assert item_done == events[-1].data["response"]["output"]  # the stream and the object agree
    body = events[-1].data["response"]
    assert body["tools"] == [
        WEATHER,
        {"type": "function", "name": "get_time", "description": None, "parameters": CLOCK["parameters"], "strict": None},
    ]
    assert (body["tool_choice"], body["parallel_tool_calls"]) == ("auto", True)
    assert [t["function"]["name"] for t in request_tools(backend.submitted[0].metadata)] == ["get_weather", "get_time"]


async def test_the_sdk_stream_helper_accumulates_the_calls() -> None:
    async with make_client(backend=FakeBackend(plan=TEXT_AND_TWO_CALLS)) as (client, _):
        async with sdk(client).responses.stream(model="m", input=ASK, tools=[WEATHER, CLOCK]) as stream:  # type: ignore[list-item]
            seen = [event async for event in stream]
            final = await stream.get_final_response()
    snapshots = [e.snapshot for e in seen if e.type == ARGS_DELTA]  # the helper's running arguments per call
    assert snapshots == ['{"city": ', '{"city": "Paris"}', "{}"]
    assert final.output_text == "Let me check. "
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.call_id, c.name, c.arguments) for c in calls] == [
        ("call_a1", "get_weather", '{"city": "Paris"}'),
        ("call_b2", "get_time", "{}"),
    ]
    assert calls[0].parsed_arguments == {"city": "Paris"}  # strict tool: the helper parses its arguments


@pytest.mark.parametrize("plan, deltas", [(A_CALL_ALONE, 3), (A_WHOLE_CALL, 1)], ids=["call-in-pieces", "call-in-one-chunk"])
async def test_a_response_of_calls_only_has_no_message_item(plan: Plan, deltas: int) -> None:
    async with make_client(backend=FakeBackend(plan=plan)) as (client, _):
        streamed = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER], "stream": True})
        plain = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER]})
        got = await client.get(f"/v1/responses/{plain.json()['id']}")
    events = named_events(streamed.text)
    check_numbered(events)
    assert [e.event for e in events] == [
        "response.created",
        "response.in_progress",
        ADDED,
        *[ARGS_DELTA] * deltas,
        *CALL_CLOSE,
        "response.completed",
    ]  # the finish chunk's empty text opens no message
    for body in (events[-1].data["response"], plain.json(), got.json()):
        response = SdkResponse.model_validate(body)
        assert response.status == "completed" and response.output_text == ""
        [call] = response.output
        assert call.type == "function_call" and call.name == "get_weather" and call.status == "completed"
        assert call.id == f"fc_{hex_of(response.id)}_0"
        assert json.loads(call.arguments) in ({"city": "Oslo"}, {"city": "Lima"})


async def test_sdk_create_stream_events_parse() -> None:
    async with make_client(backend=FakeBackend(plan=A_CALL_ALONE)) as (client, _):
        stream = await sdk(client).responses.create(model="m", input=ASK, tools=[WEATHER], stream=True)  # type: ignore[list-item]
        events = [event async for event in stream]
    added = [e for e in events if e.type == ADDED]
    assert len(added) == 1 and added[0].item.type == "function_call"
    arguments = "".join(e.delta for e in events if e.type == ARGS_DELTA)
    assert json.loads(arguments) == {"city": "Oslo"}
    assert events[-1].type == "response.completed"


async def test_text_after_a_call_is_a_second_message_item() -> None:
    plan = planned(("{}", ToolCallDelta(0, "call_t", "get_time")), ("", None), ("It is ", None), ("noon.", None), finish="stop")
    async with make_client(backend=FakeBackend(plan=plan)) as (client, _):
        r = await client.post("/v1/responses", json={"input": ASK, "tools": [CLOCK], "stream": True})
    events = named_events(r.text)
    check_numbered(events)
    h = hex_of(r.headers["x-request-id"])
    # The empty piece after the call is held back, then joins the message the next text opens.
    assert [e.event for e in events][2:] == [
        ADDED,
        ARGS_DELTA,
        *CALL_CLOSE,
        *MESSAGE_OPEN,
        *[TEXT_DELTA] * 4,
        *MESSAGE_CLOSE,
        "response.completed",
    ]
    final = SdkResponse.model_validate(events[-1].data["response"])
    assert [(item.type, item.id) for item in final.output] == [("function_call", f"fc_{h}_0"), ("message", f"msg_{h}")]
    assert final.output_text == "It is noon."


async def test_failure_mid_call_leaves_the_call_incomplete() -> None:
    def plan(request: DownstreamRequest, chunks: list[Chunk]) -> list[Chunk]:
        rid = request.request_id
        return [
            Chunk(rid, 0, '{"city": ', tool_call=ToolCallDelta(0, "call_f", "get_weather")),
            Chunk(rid, 1, "", fin=True, finish_reason="error", error="the model broke"),
        ]

    async with make_client(backend=FakeBackend(plan=plan)) as (client, _):
        r = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER], "stream": True})
    events = named_events(r.text)
    check_numbered(events)
    assert [e.event for e in events][-3:] == [*CALL_CLOSE, "response.failed"]
    failed = events[-1].data["response"]
    assert failed["status"] == "failed" and failed["error"]["message"] == "the model broke"
    assert failed["output"] == [events[-2].data["item"]]
    assert failed["output"][0]["status"] == "incomplete" and failed["output"][0]["arguments"] == '{"city": '


async def test_resume_with_tool_calls_gives_the_same_events_with_the_same_numbers() -> None:
    async with make_client(backend=FakeBackend(plan=TEXT_AND_TWO_CALLS, delay_s=0.001)) as (client, _):
        r = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER, CLOCK], "stream": True, "background": True})
        original = named_events(r.text)
        url = f"/v1/responses/{r.headers['x-request-id']}"
        replay = named_events((await client.get(url, params={"stream": "true"})).text)
        cuts = {}
        for after in range(-1, len(original) + 2):
            cuts[after] = named_events((await client.get(url, params={"stream": "true", "starting_after": after})).text)
    check_numbered(original)
    assert original[-1].event == "response.completed" and len(original) == 19
    assert [e.raw for e in replay] == [e.raw for e in original]
    for after, events in cuts.items():
        assert [e.raw for e in events] == [e.raw for e in original if e.data["sequence_number"] > after], after


async def test_a_live_stream_that_saw_only_text_at_first_matches_the_replay() -> None:
    """Read live while the pieces arrive in steps (text, a call's first piece, the rest): the events read live,
    and those of a reader resumed mid-call, are exactly the replay's."""
    backend = FakeBackend(silent=True)
    async with make_client(backend=backend) as (client, _):
        r = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER, CLOCK], "background": True})
        rid = r.json()["id"]
        url = f"/v1/responses/{rid}"
        state = client.app.state.registry.get(rid)  # type: ignore[attr-defined]
        live = asyncio.ensure_future(client.get(url, params={"stream": "true"}))
        await wait_until_async(lambda: state._waiters, what="the live reader to wait on the state")
        chunks = TEXT_AND_TWO_CALLS(DownstreamRequest(rid, [], {}), [])
        steps = [chunks[:2], chunks[2:3], chunks[3:]]
        backend.deliver(steps[0])
        await wait_until_async(lambda: state._waiters, what="the live reader to wait after the text")
        backend.deliver(steps[1])
        await wait_until_async(lambda: state._waiters, what="the live reader to wait mid-call")
        resumed = asyncio.ensure_future(client.get(url, params={"stream": "true", "starting_after": 10}))
        await wait_until_async(lambda: len(state._waiters) == 2, what="both readers to wait mid-call")
        backend.deliver(steps[2])
        got = named_events((await asyncio.wait_for(live, 10)).text)
        rest = named_events((await asyncio.wait_for(resumed, 10)).text)
        replay = named_events((await client.get(url, params={"stream": "true"})).text)
    check_numbered(replay)
    assert [e.raw for e in got] == [e.raw for e in replay]
    assert [e.raw for e in rest] == [e.raw for e in replay[11:]]
    assert rest[0].event == ARGS_DELTA and rest[0].data["delta"] == '"Paris"}'  # resumed mid-call


async def test_a_leading_empty_piece_opens_no_message_before_a_call() -> None:
    plan = planned(("", None), ("{}", ToolCallDelta(0, "call_e", "get_time")))
    async with make_client(backend=FakeBackend(plan=plan)) as (client, _):
        r = await client.post("/v1/responses", json={"input": ASK, "tools": [CLOCK], "stream": True})
    events = named_events(r.text)
    check_numbered(events)
    assert [e.event for e in events][2:] == [ADDED, ARGS_DELTA, *CALL_CLOSE, "response.completed"]
    assert [item["type"] for item in events[-1].data["response"]["output"]] == ["function_call"]


async def test_input_items_and_tools_reach_the_node() -> None:
    body = {
        "input": [
            {"role": "user", "content": ASK},
            {"type": "function_call", "call_id": "call_a1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
            {"type": "function_call", "call_id": "call_b2", "name": "get_time", "arguments": "{}", "id": "fc_1"},
            {"type": "function_call_output", "call_id": "call_a1", "output": "21 C and sunny"},
            {"type": "function_call_output", "call_id": "call_b2", "output": [{"type": "input_text", "text": "14:05"}]},
            {"role": "assistant", "content": "It is sunny."},
        ],
        "tools": [WEATHER, CLOCK],
        "tool_choice": {"type": "function", "name": "get_weather"},
        "parallel_tool_calls": False,
    }
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json=body)
    assert r.status_code == 200, r.text
    assert (r.json()["tool_choice"], r.json()["parallel_tool_calls"]) == ({"type": "function", "name": "get_weather"}, False)
    request = backend.submitted[0]
    assert request_tool_choice(request.metadata) == {"type": "function", "function": {"name": "get_weather"}}
    assert request.metadata["parallel_tool_calls"] is False
    [weather, _] = request_tools(request.metadata)
    assert weather == {
        "type": "function",
        "function": {k: v for k, v in WEATHER.items() if k != "type"},
    }  # the chat wire form
    parts = parse_request_texts(request.texts)
    assert [(p.role, p.kind) for p in parts] == [
        ("user", "text"),
        ("assistant", "tool_calls"),  # consecutive function_call items: one assistant turn
        ("tool", "text"),
        ("tool", "text"),
        ("assistant", "text"),
    ]
    assert [(c.id, c.name, c.arguments) for c in parts[1].calls()] == [
        ("call_a1", "get_weather", '{"city":"Paris"}'),
        ("call_b2", "get_time", "{}"),
    ]
    assert [(p.tool_call_id, p.content) for p in parts[2:4]] == [("call_a1", "21 C and sunny"), ("call_b2", "14:05")]


async def test_previous_response_id_carries_the_calls() -> None:
    async with make_client(backend=FakeBackend(plan=TEXT_AND_TWO_CALLS)) as (client, backend):
        first = await client.post("/v1/responses", json={"input": ASK, "tools": [WEATHER, CLOCK]})
        outputs = [
            {"type": "function_call_output", "call_id": "call_a1", "output": "21 C"},
            {"type": "function_call_output", "call_id": "call_b2", "output": "14:05"},
        ]
        second = await client.post(
            "/v1/responses", json={"input": outputs, "previous_response_id": first.json()["id"], "tools": [WEATHER, CLOCK]}
        )
    assert second.status_code == 200, second.text
    parts = parse_request_texts(backend.submitted[1].texts)
    assert [(p.role, p.kind, p.content if p.kind == "text" else None) for p in parts] == [
        ("user", "text", ASK),
        ("assistant", "text", "Let me check. "),
        ("assistant", "tool_calls", None),
        ("tool", "text", "21 C"),
        ("tool", "text", "14:05"),
    ]
    assert [(c.id, c.name, c.arguments) for c in parts[2].calls()] == [
        ("call_a1", "get_weather", '{"city": "Paris"}'),
        ("call_b2", "get_time", "{}"),
    ]


async def test_without_tools_nothing_changes() -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json={"input": "hi there"})
    body = r.json()
    assert (body["tools"], body["tool_choice"], body["parallel_tool_calls"]) == ([], "auto", True)
    assert [item["type"] for item in body["output"]] == ["message"]
    assert not {"tools", "tool_choice", "parallel_tool_calls"} & set(backend.submitted[0].metadata)


@pytest.mark.parametrize(
    "extra, param",
    [
        pytest.param({"tools": [{**WEATHER, "name": "bad name!"}]}, "tools[0].name", id="tool-name"),
        pytest.param({"tools": [{"type": "function"}]}, "tools[0].name", id="tool-without-name"),
        pytest.param({"tools": [WEATHER, {**CLOCK, "parameters": "x"}]}, "tools[1].parameters", id="tool-parameters"),
        pytest.param({"tools": [{"type": "web_search"}]}, "tools[0].type", id="tool-type"),
        pytest.param({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools[0].name", id="chat-shaped-tool"),
        pytest.param({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice", id="tool-choice-word"),
        pytest.param({"tools": [WEATHER], "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice", id="no-such"),
        pytest.param({"tools": [WEATHER], "tool_choice": {"type": "file_search"}}, "tool_choice.type", id="choice-type"),
        pytest.param({"tool_choice": "required"}, "tool_choice", id="required-without-tools"),
        pytest.param({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls", id="parallel"),
    ],
)
async def test_bad_tools_name_the_field(extra: dict[str, Any], param: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json={"input": "x", **extra})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error
    assert not backend.submitted


@pytest.mark.parametrize(
    "item, param",
    [
        pytest.param({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id", id="call-without-id"),
        pytest.param({"type": "function_call", "call_id": "c", "name": "f"}, "input[0].arguments", id="call-without-args"),
        pytest.param(
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": 1}}, "input[0].arguments", id="args-object"
        ),
        pytest.param(
            {"type": "function_call", "call_id": "c\nx", "name": "f", "arguments": "{}"}, "input[0].call_id", id="id-newline"
        ),
        pytest.param({"type": "function_call_output", "call_id": "c"}, "input[0].output", id="output-missing"),
        pytest.param({"type": "function_call_output", "call_id": "c", "output": 5}, "input[0].output", id="output-number"),
        pytest.param(
            {"type": "function_call_output", "call_id": "c", "output": [{"type": "input_image", "image_url": "x"}]},
            "input[0].output[0].type",
            id="output-image",
        ),
        pytest.param({"type": "file_search_call", "queries": []}, "input[0].type", id="other-item-type"),
    ],
)
async def test_bad_input_items_name_the_field(item: dict[str, Any], param: str) -> None:
    async with make_client() as (client, backend):
        r = await client.post("/v1/responses", json={"input": [item]})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()
    assert not backend.submitted
