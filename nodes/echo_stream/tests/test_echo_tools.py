"""Tool mode: ``call <name> <json object>`` lines become streamed tool calls, in both the normal and the step mode."""

from __future__ import annotations

import json
import re
from typing import Any

import pyarrow as pa
import pytest
from echo_stream.engine import EchoStream
from echo_stream.settings import Settings
from echo_stream.step import StepEcho

from openai_stream_protocol import (
    USER_TEXT_PREFIX,
    Chunk,
    Part,
    ToolCall,
    encode_tools,
    is_batch,
)
from openai_stream_protocol.testing import RecordingNode

FAST = Settings(token_delay_s=0)
STEP = Settings(token_delay_s=0, step_ms=1)


def tool(name: str) -> dict[str, Any]:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object"}}}


TOOLS = encode_tools([tool("get_weather"), tool("get_time")])
WEATHER = {"city": "Paris", "unit": "C"}


def of(recorder: RecordingNode, request_id: str) -> list[Chunk]:
    """One request's chunks, from single chunks (normal mode) or batches (step mode), numbered without gaps."""
    assert all(sent.output_id == "chunks" and "flush" not in sent.metadata for sent in recorder.sent)
    chunks = recorder.chunks(request_id)
    assert [c.seq for c in chunks] == list(range(len(chunks)))
    return chunks


def request(request_id: str, *texts: str, **metadata: Any) -> dict[str, Any]:
    meta = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, "max_tokens": 0, **metadata}
    return {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array(list(texts), type=pa.string()), "metadata": meta}


def user(text: str) -> str:
    return USER_TEXT_PREFIX + text


def run(*events: dict[str, Any], settings: Settings = FAST) -> RecordingNode:
    recorder = RecordingNode()
    (StepEcho if settings.step_ms else EchoStream)(recorder, settings).run(list(events))
    return recorder


def calls_of(chunks: list[Chunk]) -> list[tuple[str | None, str | None, str]]:
    """(id, name, arguments) per call index, from the deltas; every call's first delta must name it."""
    calls: dict[int, list[Any]] = {}
    for chunk in chunks:
        if chunk.tool_call is None:
            continue
        delta = chunk.tool_call
        if delta.index not in calls:
            assert delta.id is not None and delta.name is not None, "a call's first chunk carries its id and name"
            calls[delta.index] = [delta.id, delta.name, ""]
        else:
            assert delta.id is None and delta.name is None
        calls[delta.index][2] += chunk.text
    assert sorted(calls) == list(range(len(calls)))
    return [tuple(calls[i]) for i in sorted(calls)]  # type: ignore[misc]


@pytest.mark.parametrize("settings", [FAST, STEP], ids=["normal", "step"])
def test_one_call_streams_its_arguments_in_pieces(settings: Settings) -> None:
    recorder = run(request("r", user(f"call get_weather {json.dumps(WEATHER)}"), **TOOLS), settings=settings)
    chunks = of(recorder, "r")
    ((call_id, name, arguments),) = calls_of(chunks)
    assert re.fullmatch(r"call_[0-9a-f]{12}", call_id or "") and name == "get_weather"
    assert json.loads(arguments) == WEATHER and arguments == json.dumps(WEATHER)
    assert sum(1 for c in chunks if c.tool_call) >= 2
    assert all(c.tool_call is not None for c in chunks[:-1])
    last = chunks[-1]
    assert (last.fin, last.finish_reason, last.tool_call, last.text) == (True, "tool_calls", None, "")
    assert last.completion_tokens == sum(1 for c in chunks if c.tool_call)  # one token per chunk
    assert [c.fin for c in chunks].count(True) == 1
    if settings.step_ms:
        assert sum(is_batch(sent.data) for sent in recorder.sent) == len(chunks)


@pytest.mark.parametrize("settings", [FAST, STEP], ids=["normal", "step"])
def test_several_lines_are_parallel_calls_in_order(settings: Settings) -> None:
    text = 'call get_weather {"city": "Paris"}\n\n  call get_time {}  \ncall get_weather {"city": "Oslo"}'
    chunks = of(run(request("r", user(text), **TOOLS), settings=settings), "r")
    calls = calls_of(chunks)
    assert [(name, json.loads(arguments)) for _, name, arguments in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
        ("get_weather", {"city": "Oslo"}),
    ]
    assert len({call_id for call_id, _, _ in calls}) == 3
    # The calls stream one after another.
    indexes = [c.tool_call.index for c in chunks if c.tool_call]
    assert indexes == sorted(indexes)
    assert chunks[-1].finish_reason == "tool_calls"


def test_parallel_tool_calls_false_sends_the_first_call_only() -> None:
    text = 'call get_time {}\ncall get_weather {"city": "Paris"}'
    chunks = of(run(request("r", user(text), **encode_tools([tool("get_weather"), tool("get_time")], None, False))), "r")
    assert [name for _, name, _ in calls_of(chunks)] == ["get_time"]
    assert chunks[-1].finish_reason == "tool_calls"


def test_tokens_per_chunk_groups_argument_tokens() -> None:
    chunks = of(
        run(
            request("r", user('call get_weather {"a": 1, "b": 2}'), **TOOLS),
            settings=Settings(token_delay_s=0, tokens_per_chunk=2),
        ),
        "r",
    )
    assert [c.text for c in chunks if c.tool_call] == ['{"a": 1,', ' "b": 2}']


@pytest.mark.parametrize("settings", [FAST, STEP], ids=["normal", "step"])
def test_a_non_streaming_request_sends_each_call_whole(settings: Settings) -> None:
    text = 'call get_weather {"city": "Paris"}\ncall get_time {}'
    chunks = of(run(request("r", user(text), stream=False, **TOOLS), settings=settings), "r")
    assert [(c.tool_call.index, c.text) for c in chunks if c.tool_call] == [(0, '{"city": "Paris"}'), (1, "{}")]
    assert len(chunks) == 3 and chunks[-1].finish_reason == "tool_calls"


@pytest.mark.parametrize(
    "text, metadata",
    [
        pytest.param('call get_weather {"city": "Paris"}', {}, id="no-tools"),
        pytest.param('call get_stock {"sym": "X"}', TOOLS, id="unknown-tool"),
        pytest.param('call get_weather {"city": "Paris"}\ncall nope {}', TOOLS, id="one-unknown-of-two"),
        pytest.param("call get_weather [1, 2]", TOOLS, id="not-an-object"),
        pytest.param('call get_weather {"city": }', TOOLS, id="bad-json"),
        pytest.param('what is the weather?\ncall get_weather {"city": "Paris"}', TOOLS, id="other-text"),
        pytest.param("call get_weather", TOOLS, id="no-arguments"),
        pytest.param(
            'call get_weather {"city": "Paris"}',
            encode_tools([tool("get_weather")], "none"),
            id="tool_choice-none",
        ),
        pytest.param(
            'call get_weather {"city": "Paris"}',
            encode_tools([tool("get_weather"), tool("get_time")], {"type": "function", "function": {"name": "get_time"}}),
            id="tool_choice-names-another",
        ),
        pytest.param('call get_weather {"city": "Paris"}', {"tools": "not json"}, id="unreadable-tools"),
    ],
)
def test_anything_else_is_echoed_as_text(text: str, metadata: dict[str, Any]) -> None:
    chunks = of(run(request("r", user(text), **metadata)), "r")
    assert all(c.tool_call is None for c in chunks)
    assert "".join(c.text for c in chunks) == text and chunks[-1].finish_reason == "stop"


def test_a_tool_result_at_the_end_is_echoed_as_content() -> None:
    call = ToolCall("call_1", "get_weather", '{"city": "Paris"}')
    texts = [
        user('call get_weather {"city": "Paris"}'),
        Part.of_tool_calls([call]).encode(),
        Part("tool", "text", "18 C and sunny", tool_call_id="call_1").encode(),
        Part("tool", "text", "call get_time {}", tool_call_id="call_2").encode(),  # a result that reads like a call
    ]
    chunks = of(run(request("r", *texts, **TOOLS)), "r")
    assert all(c.tool_call is None for c in chunks)
    assert "".join(c.text for c in chunks) == "18 C and sunny\ncall get_time {}"
    assert chunks[-1].finish_reason == "stop"


def test_stamp_and_cancel_work_in_tool_mode() -> None:
    recorder = RecordingNode()
    echo = EchoStream(recorder, Settings(token_delay_s=0, stamp=True), clock=lambda: 0.0)
    echo.handle(request("r", user('call get_weather {"city": "Paris", "unit": "C"}'), **TOOLS))
    echo.step(0.0)
    echo.step(0.0)
    echo.handle({"type": "INPUT", "id": "cancel", "value": pa.array(["r"]), "metadata": {"request_id": "r"}})
    for _ in range(10):
        echo.step(0.0)
    chunks = of(recorder, "r")
    assert len(chunks) == 2 and all(c.tool_call is not None and c.sent_at is not None for c in chunks)
    assert not any(c.fin for c in chunks)
