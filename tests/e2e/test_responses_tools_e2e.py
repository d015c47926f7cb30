"""Tool calls through /v1/responses against the real dataflow, with echo_stream's tool mode.

echo_stream answers a last user turn of ``call <name> <json object>`` lines with those calls
(nodes/echo_stream/echo_stream/tools.py); the official openai SDK reads them as ``function_call``
output items, and a follow-up turn with the results gets them echoed back as text.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WEATHER: Any = {
    "type": "function",
    "name": "get_weather",
    "description": "The current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CLOCK: Any = {"type": "function", "name": "get_time", "parameters": {"type": "object", "properties": {}}}


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_a_streamed_call_is_a_function_call_item(echo_flow: Dataflow) -> None:
    stream = sdk(echo_flow).responses.create(
        model="m", input='call get_weather {"city": "Paris"}', tools=[WEATHER, CLOCK], stream=True
    )
    events = list(stream)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["function_call"]  # no message item: the answer is the call alone
    [call] = added
    deltas = [e for e in events if e.type == "response.function_call_arguments.delta"]
    assert len(deltas) >= 2 and {(e.item_id, e.output_index) for e in deltas} == {(call.id, 0)}  # in pieces
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(done.arguments) == {"city": "Paris"} and done.arguments == "".join(e.delta for e in deltas)
    final = events[-1]
    assert final.type == "response.completed" and final.response.status == "completed"
    [item] = final.response.output
    assert item.type == "function_call" and item.name == "get_weather" and item.call_id.startswith("call_")
    assert item.id == call.id and item.call_id == call.call_id and json.loads(item.arguments) == {"city": "Paris"}
    assert [t.name for t in final.response.tools] == ["get_weather", "get_time"]  # type: ignore[union-attr]


def test_stream_helper_then_results_by_previous_response_id(echo_flow: Dataflow) -> None:
    client = sdk(echo_flow)
    ask = 'call get_weather {"city": "Oslo"}\ncall get_time {}'
    with client.responses.stream(model="m", input=ask, tools=[WEATHER, CLOCK]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    calls = [item for item in final.output if item.type == "function_call"]
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather", {"city": "Oslo"}), ("get_time", {})]
    assert calls[0].parsed_arguments == {"city": "Oslo"}  # a strict tool: the helper parses the arguments
    assert final.output_text == ""
    follow_up = client.responses.create(
        model="m",
        previous_response_id=final.id,
        input=[
            {"type": "function_call_output", "call_id": calls[0].call_id, "output": "Oslo: 4 C, light rain"},
            {"type": "function_call_output", "call_id": calls[1].call_id, "output": "14:05"},
        ],
        tools=[WEATHER, CLOCK],
    )
    assert follow_up.status == "completed" and [item.type for item in follow_up.output] == ["message"]
    assert "Oslo: 4 C, light rain" in follow_up.output_text and "14:05" in follow_up.output_text


def test_the_whole_conversation_as_input_items(echo_flow: Dataflow) -> None:
    client = sdk(echo_flow)
    ask = 'call get_weather {"city": "Lima"}'
    first = client.responses.create(model="m", input=ask, tools=[WEATHER], store=False)
    [call] = first.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Lima"}
    answer = client.responses.create(
        model="m",
        input=[
            {"role": "user", "content": ask},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "Lima: 19 C"},
        ],
        tools=[WEATHER],
        stream=True,
    )
    events = list(answer)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert "Lima: 19 C" in text and events[-1].type == "response.completed"
    declined = client.responses.create(model="m", input=ask, tools=[WEATHER], tool_choice="none")
    assert declined.output_text == ask and declined.tool_choice == "none"


def test_bad_tools_name_the_field(echo_flow: Dataflow) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(echo_flow).responses.create(
            model="m",
            input="hi",
            tools=[{"type": "function", "name": "f", "parameters": "not an object"}],  # type: ignore[typeddict-item]
        )
    assert info.value.param == "tools[0].parameters"  # type: ignore[attr-defined]
