"""/v1/messages through the official anthropic SDK against the real ``dora run dataflow-stream.yml``."""

from __future__ import annotations

from typing import Any

import anthropic
import pytest

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROMPT = "Stream me back,  word by word:\n exactly as  sent. "
WEATHER: Any = {
    "name": "get_weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def sdk(flow: Dataflow) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=flow.base_url, api_key="unused", max_retries=0, timeout=30)


def test_create_returns_the_echo(echo_flow: Dataflow) -> None:
    message = sdk(echo_flow).messages.create(
        model="claude-test", max_tokens=100, system="be terse", messages=[{"role": "user", "content": PROMPT}]
    )
    assert message.id.startswith("msg_") and message.model == "claude-test"
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == PROMPT  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


def test_stream_gives_the_echo_in_text_deltas(echo_flow: Dataflow) -> None:
    with sdk(echo_flow).messages.stream(model="m", max_tokens=100, messages=[{"role": "user", "content": PROMPT}]) as stream:
        texts = list(stream.text_stream)
        final = stream.get_final_message()
    assert "".join(texts) == PROMPT
    assert len(texts) > 3  # the echo paces its tokens, so they arrive as several events
    assert final.content[0].text == PROMPT  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn" and final.usage.output_tokens > 0


def test_max_tokens_stops_the_echo(echo_flow: Dataflow) -> None:
    message = sdk(echo_flow).messages.create(
        model="m", max_tokens=2, messages=[{"role": "user", "content": "one two three four"}]
    )
    assert message.content[0].text == "one two"  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_stop_sequence_ends_the_echo_and_is_named(echo_flow: Dataflow, streamed: bool) -> None:
    request: Any = {
        "model": "m",
        "max_tokens": 100,
        "stop_sequences": ["END", "STOP"],
        "messages": [{"role": "user", "content": "one two STOP three"}],
    }
    if streamed:
        with sdk(echo_flow).messages.stream(**request) as stream:
            message = stream.get_final_message()
    else:
        message = sdk(echo_flow).messages.create(**request)
    assert [block.to_dict() for block in message.content] == [{"type": "text", "text": "one two "}]
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "STOP")


@pytest.mark.parametrize("streamed", [False, True])
def test_tool_use_round_trip(echo_flow: Dataflow, streamed: bool) -> None:
    client = sdk(echo_flow)
    question: Any = {"role": "user", "content": 'call get_weather {"city": "Paris"}'}
    request: dict[str, Any] = {"model": "m", "max_tokens": 100, "tools": [WEATHER]}
    if streamed:
        with client.messages.stream(**request, messages=[question]) as stream:
            first = stream.get_final_message()
    else:
        first = client.messages.create(**request, messages=[question])
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use" and call.name == "get_weather" and call.input == {"city": "Paris"}
    assert call.id.startswith("call_")
    answer = client.messages.create(
        **request,
        messages=[
            question,
            {"role": "assistant", "content": [block.to_dict() for block in first.content]},  # type: ignore[misc]
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "21 C and sunny"}]},
        ],
    )
    assert [block.to_dict() for block in answer.content] == [{"type": "text", "text": "21 C and sunny"}]
    assert answer.stop_reason == "end_turn"


def test_an_image_block_reaches_the_node_as_an_image(echo_flow: Dataflow) -> None:
    message = sdk(echo_flow).messages.create(
        model="m",
        max_tokens=100,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this image?"},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                    {"type": "image", "source": {"type": "url", "url": "https://example.com/image.jpg"}},
                ],
            }
        ],
    )
    # echo_stream skips image parts, in its answer and in its prompt_tokens: sent as text, they would show in both
    assert message.content[0].text == "What is in this image?"  # type: ignore[union-attr]
    assert message.usage.input_tokens == 5


def test_count_tokens(echo_flow: Dataflow) -> None:
    counted = sdk(echo_flow).messages.count_tokens(model="m", messages=[{"role": "user", "content": "one two three"}])
    assert counted.input_tokens == 3


def test_bad_input_is_a_bad_request_naming_the_field(echo_flow: Dataflow) -> None:
    client = sdk(echo_flow)
    with pytest.raises(anthropic.BadRequestError) as no_tokens:
        client.messages.create(model="m", max_tokens=0, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(anthropic.BadRequestError) as bad_block:
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "video"}]}],  # type: ignore[list-item]
        )
    with pytest.raises(anthropic.BadRequestError) as bad_choice:
        client.messages.create(
            model="m",
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            tools=[WEATHER],
            tool_choice={"type": "tool", "name": "get_time"},
        )
    assert "max_tokens: " in no_tokens.value.message
    assert "messages.0.content.1.type: " in bad_block.value.message
    assert "tool_choice.name: " in bad_choice.value.message
    assert bad_block.value.body == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": bad_block.value.body["error"]["message"]},  # type: ignore[index]
    }
