"""Tool calls through /v1/chat/completions against the real dataflow, with echo_stream's tool mode.

echo_stream answers a last user turn of ``call <name> <json object>`` lines with those calls
(nodes/echo_stream/echo_stream/tools.py), so what the SDKs accumulate can be checked exactly.
"""

from __future__ import annotations

import json
from typing import Any

import langchain_openai
import openai
import pytest

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

WEATHER: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["C", "F"]}},
            "required": ["city"],
        },
    },
}
CLOCK: Any = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def streamed_calls(stream: Any) -> tuple[str, dict[int, dict[str, Any]], list[str | None]]:
    """Content, the calls by index (id, name, arguments text) and the finish reasons, accumulated as clients do."""
    content, calls, reasons = "", {}, []
    for chunk in stream:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or ():
            call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": "", "deltas": 0})
            call["id"] += delta.id or ""
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
            call["deltas"] += 1
        reasons.append(choice.finish_reason)
    return content, calls, reasons


def test_a_streamed_call_parses_to_the_arguments_given(echo_flow: Dataflow) -> None:
    arguments = {"city": "Paris", "unit": "C"}
    stream = sdk(echo_flow).chat.completions.create(
        model="m",
        messages=[{"role": "user", "content": f"call get_weather {json.dumps(arguments)}"}],
        tools=[WEATHER, CLOCK],
        stream=True,
    )
    content, calls, reasons = streamed_calls(stream)
    assert content == ""
    [call] = calls.values()
    assert call["name"] == "get_weather" and call["id"].startswith("call_")
    assert json.loads(call["arguments"]) == arguments
    assert call["deltas"] > 2  # the arguments arrive in pieces
    assert reasons[-1] == "tool_calls" and reasons.count("tool_calls") == 1


def test_parallel_calls_then_the_results_in_a_follow_up_turn(echo_flow: Dataflow) -> None:
    client = sdk(echo_flow)
    ask = 'call get_weather {"city": "Oslo"}\ncall get_time {}'
    first = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": ask}], tools=[WEATHER, CLOCK], stream=True
    )
    _, calls, reasons = streamed_calls(first)
    assert [(calls[i]["name"], json.loads(calls[i]["arguments"])) for i in sorted(calls)] == [
        ("get_weather", {"city": "Oslo"}),
        ("get_time", {}),
    ]
    assert reasons[-1] == "tool_calls"
    assistant = {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
            for c in (calls[0], calls[1])
        ],
    }
    follow_up = client.chat.completions.create(
        model="m",
        messages=[
            {"role": "user", "content": ask},
            assistant,  # type: ignore[list-item]
            {"role": "tool", "tool_call_id": calls[0]["id"], "content": "Oslo: 4 C, light rain"},
            {"role": "tool", "tool_call_id": calls[1]["id"], "content": "14:05"},
        ],
        tools=[WEATHER, CLOCK],
    )
    choice = follow_up.choices[0]
    assert choice.finish_reason == "stop" and not choice.message.tool_calls
    assert "Oslo: 4 C, light rain" in (choice.message.content or "") and "14:05" in (choice.message.content or "")


def test_non_stream_and_tool_choice_none(echo_flow: Dataflow) -> None:
    client = sdk(echo_flow)
    text = 'call get_weather {"city": "Lima"}'
    called = client.chat.completions.create(model="m", messages=[{"role": "user", "content": text}], tools=[WEATHER])
    [call] = called.choices[0].message.tool_calls or []
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Lima"})
    assert called.choices[0].finish_reason == "tool_calls" and called.choices[0].message.content is None
    declined = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": text}], tools=[WEATHER], tool_choice="none"
    )
    assert declined.choices[0].message.content == text and declined.choices[0].finish_reason == "stop"


def test_bad_tools_name_the_field(echo_flow: Dataflow) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk(echo_flow).chat.completions.create(
            model="m",
            messages=[{"role": "user", "content": "hi"}],
            tools=[{"type": "function", "function": {"name": "f", "parameters": "not an object"}}],  # type: ignore[typeddict-item]
        )
    assert info.value.param == "tools[0].function.parameters"  # type: ignore[attr-defined]


def test_langchain_bind_tools_sees_the_call(echo_flow: Dataflow) -> None:
    def get_weather(city: str, unit: str = "C") -> str:
        """The current weather in a city."""
        return f"{city}: 20 {unit}"

    model = langchain_openai.ChatOpenAI(
        model="m", base_url=echo_flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30
    ).bind_tools([get_weather])
    message = model.invoke('call get_weather {"city": "Rome", "unit": "F"}')
    assert [(c["name"], c["args"]) for c in message.tool_calls] == [("get_weather", {"city": "Rome", "unit": "F"})]
    chunks = list(model.stream('call get_weather {"city": "Kyiv"}'))
    gathered = chunks[0]
    for chunk in chunks[1:]:
        gathered += chunk
    assert [(c["name"], c["args"]) for c in gathered.tool_calls] == [("get_weather", {"city": "Kyiv"})]
