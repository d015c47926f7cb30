"""Reasoning through the real dataflow (``dora run``, echo-stream's reasoning mode) with the openai and anthropic SDKs.

A last user message that starts with ``<think>`` is echoed as reasoning up to ``</think>``, the rest as the
answer (nodes/echo_stream/README.md); each surface must put the reasoning where its SDK reads it, before the
answer, and the request's reasoning wish must reach the node (``none`` turns the echo's reasoning off).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest

from openai_stream_protocol import split_tokens
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

THOUGHT = "The user greets me;  answer  briefly — ✓ 👋"
ANSWER = "Hello there,\n friend!"
PROMPT = f"<think>{THOUGHT}</think>{ANSWER}"
MESSAGES: Any = [{"role": "user", "content": PROMPT}]


@pytest.fixture(scope="module", params=["chunks", "step batches"])
def flow(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """The shipped dataflow, echo sending single chunks or (step mode) one batch message per step."""
    env = {"echo-stream": {"ECHO_STEP_MS": "10"}} if request.param == "step batches" else None
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("reasoning-flow"), env=env) as flow:
        yield flow


def openai_sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{flow.base_url}/v1", api_key="unused", max_retries=0, timeout=30)


def test_chat_streams_reasoning_content_before_the_content(flow: Dataflow) -> None:
    stream = openai_sdk(flow).chat.completions.create(
        model="m", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    order, thought, content, usage = [], "", "", None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        piece = (delta.model_extra or {}).get("reasoning_content")
        if piece:
            thought += piece
            order.append("reasoning")
        if delta.content:
            content += delta.content
            order.append("content")
    assert (thought, content) == (THOUGHT, ANSWER)
    assert order.index("content") > max(i for i, kind in enumerate(order) if kind == "reasoning")
    assert usage is not None and usage.completion_tokens_details is not None
    assert usage.completion_tokens_details.reasoning_tokens == len(split_tokens(THOUGHT))
    assert usage.completion_tokens == len(split_tokens(THOUGHT)) + len(split_tokens(ANSWER))


def test_chat_whole_and_reasoning_effort_none(flow: Dataflow) -> None:
    client = openai_sdk(flow)
    whole = client.chat.completions.create(model="m", messages=MESSAGES)
    message = whole.choices[0].message
    assert message.content == ANSWER and (message.model_extra or {})["reasoning_content"] == THOUGHT
    off = client.chat.completions.create(model="m", messages=MESSAGES, reasoning_effort="none")
    assert off.choices[0].message.content == ANSWER
    assert "reasoning_content" not in (off.choices[0].message.model_extra or {})


def test_responses_stream_helper_and_resume(flow: Dataflow) -> None:
    client = openai_sdk(flow)
    with client.responses.stream(model="m", input=PROMPT, reasoning={"effort": "low"}) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_response()
    assert kinds.index("response.reasoning_text.delta") < kinds.index("response.output_text.delta")
    reasoning, message = final.output
    assert reasoning.type == "reasoning" and reasoning.content is not None and reasoning.content[0].text == THOUGHT
    assert final.output_text == ANSWER and final.reasoning is not None and final.reasoning.effort == "low"
    assert final.usage is not None and final.usage.output_tokens_details.reasoning_tokens == len(split_tokens(THOUGHT))
    # Resume after the second reasoning delta: the rest of the events, numbered as the first stream had them.
    events = list(client.responses.retrieve(final.id, stream=True))
    after = next(e.sequence_number for e in events if e.type == "response.reasoning_text.delta") + 1
    resumed = list(client.responses.retrieve(final.id, stream=True, starting_after=after))
    assert [(e.type, e.sequence_number) for e in resumed] == [(e.type, e.sequence_number) for e in events[after + 1 :]]


def test_anthropic_thinking_blocks(flow: Dataflow) -> None:
    client = anthropic.Anthropic(base_url=flow.base_url, api_key="unused", max_retries=0, timeout=30)
    thinking: Any = {"type": "enabled", "budget_tokens": 1024}
    with client.messages.stream(model="m", max_tokens=2048, thinking=thinking, messages=MESSAGES) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert "thinking" in kinds and kinds.index("thinking") < kinds.index("text")
    assert [block.type for block in final.content] == ["thinking", "text"]
    assert final.content[0].thinking == THOUGHT and final.content[0].signature  # type: ignore[union-attr]
    assert final.content[1].text == ANSWER  # type: ignore[union-attr]
    off = client.messages.create(model="m", max_tokens=256, thinking={"type": "disabled"}, messages=MESSAGES)
    assert [block.type for block in off.content] == ["text"] and off.content[0].text == ANSWER  # type: ignore[union-attr]
