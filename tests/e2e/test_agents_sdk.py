"""The openai Agents SDK, as a new user would point it at the server, against the real dataflow.

An agent with one function tool runs on both of the SDK's model classes (chat completions and
the Responses API). echo_stream's tool mode makes the first turn call the tool and the second
turn echo the tool's result, so the run's final output is exactly what the tool returned.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from agents import (
    Agent,
    OpenAIChatCompletionsModel,
    OpenAIResponsesModel,
    Runner,
    function_tool,
    set_tracing_disabled,
)
from openai import AsyncOpenAI

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

MODELS = {"chat": OpenAIChatCompletionsModel, "responses": OpenAIResponsesModel}


@pytest.mark.parametrize("surface", sorted(MODELS))
def test_an_agent_calls_its_tool_and_answers_with_the_result(echo_flow: Dataflow, surface: str) -> None:
    set_tracing_disabled(True)  # no trace upload: nothing leaves 127.0.0.1
    asked: list[str] = []

    @function_tool
    def get_weather(city: str) -> str:
        """The current weather in a city."""
        asked.append(city)
        return f"{city}: 21 C and sunny"

    async def run() -> tuple[Any, Any]:
        client = AsyncOpenAI(base_url=echo_flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)
        model = MODELS[surface](model="m", openai_client=client)
        agent = Agent(name="weather", instructions="Use the tools.", tools=[get_weather], model=model)
        result = await Runner.run(agent, 'call get_weather {"city": "Paris"}', max_turns=3)
        streamed = Runner.run_streamed(agent, 'call get_weather {"city": "Oslo"}', max_turns=3)
        events = [event.type async for event in streamed.stream_events()]
        assert "raw_response_event" in events and "run_item_stream_event" in events
        return result.final_output, streamed.final_output

    first, second = asyncio.run(asyncio.wait_for(run(), 120))
    assert asked == ["Paris", "Oslo"]
    assert (first, second) == ("Paris: 21 C and sunny", "Oslo: 21 C and sunny")
