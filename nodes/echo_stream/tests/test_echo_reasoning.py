"""Reasoning mode: a last user turn that starts with ``<think>`` is echoed as reasoning, then answer."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from echo_stream.engine import EchoStream
from echo_stream.plan import split_thinking
from echo_stream.settings import Settings
from echo_stream.step import StepEcho

from openai_stream_protocol import USER_TEXT_PREFIX, Chunk, Continuation, ReasoningRequest
from openai_stream_protocol.testing import RecordingNode

FAST = Settings(token_delay_s=0)


def request(request_id: str, text: str, **metadata: Any) -> dict[str, Any]:
    meta = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, "max_tokens": 0, **metadata}
    return {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array([USER_TEXT_PREFIX + text]), "metadata": meta}


def answer(text: str, settings: Settings = FAST, **metadata: Any) -> list[Chunk]:
    recorder = RecordingNode()
    echo = StepEcho(recorder, settings) if settings.step_ms else EchoStream(recorder, settings)
    echo.run([request("r", text, **metadata)])
    chunks = recorder.chunks("r")
    first = chunks[0].seq if chunks else 0
    assert [c.seq for c in chunks] == list(range(first, first + len(chunks)))
    return chunks


def kinds(chunks: list[Chunk]) -> tuple[str, str]:
    return "".join(c.text for c in chunks if c.reasoning), "".join(c.text for c in chunks if not c.reasoning)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("<think>why not</think>Because.", ("why not", "Because.")),
        ("<think>never closed", ("never closed", "")),
        ("<think></think>just this", ("", "just this")),
        ("no tag <think>here</think>", ("", "no tag <think>here</think>")),
    ],
)
def test_split_thinking(text: str, expected: tuple[str, str]) -> None:
    assert split_thinking(text) == expected


@pytest.mark.parametrize("settings", [FAST, Settings(token_delay_s=0, tokens_per_chunk=3), Settings(token_delay_s=0, step_ms=5)])
def test_reasoning_first_then_the_answer_and_no_chunk_mixes_them(settings: Settings) -> None:
    chunks = answer("<think>let me see it now</think>It is so.", settings)
    assert kinds(chunks) == ("let me see it now", "It is so.")
    first_answer = next(i for i, c in enumerate(chunks) if not c.reasoning)
    assert all(c.reasoning for c in chunks[:first_answer]) and not any(c.reasoning for c in chunks[first_answer:])
    assert chunks[-1].fin and chunks[-1].reasoning_tokens == 5 and chunks[-1].completion_tokens == 8


def test_reasoning_only_ends_with_an_empty_finish() -> None:
    chunks = answer("<think>still thinking")
    assert kinds(chunks) == ("still thinking", "")
    assert chunks[-1].fin and chunks[-1].text == "" and not chunks[-1].reasoning


def test_a_non_streaming_answer_is_one_reasoning_chunk_and_one_answer_chunk() -> None:
    chunks = answer("<think>a b c</think>d e", stream=False)
    assert [(c.text, c.reasoning, c.fin) for c in chunks] == [("a b c", True, False), ("d e", False, True)]


def test_reasoning_turned_off_by_the_request_leaves_the_answer() -> None:
    chunks = answer("<think>hidden</think>shown", **ReasoningRequest("none").to_metadata())
    assert kinds(chunks) == ("", "shown") and chunks[-1].reasoning_tokens is None
    assert kinds(answer("<think>kept</think>shown", **ReasoningRequest("high").to_metadata())) == ("kept", "shown")


def test_max_tokens_counts_reasoning_and_stop_strings_cut_only_the_answer() -> None:
    chunks = answer("<think>one two three</think>four five", max_tokens=2)
    assert kinds(chunks) == ("one two", "") and chunks[-1].finish_reason == "length"
    chunks = answer("<think>say STOP here</think>and STOP there", stop=["STOP"])
    assert kinds(chunks) == ("say STOP here", "and ") and chunks[-1].stop_sequence == "STOP"


def test_a_continuation_goes_on_in_the_right_kind() -> None:
    # Two reasoning pieces and nothing of the answer were delivered (as plain text: that is all the server sends).
    delivered = Continuation.of(["a ", "b "])
    chunks = answer("<think>a b c</think>d e", **delivered.to_metadata())
    assert chunks[0].seq == 2
    assert kinds(chunks) == ("c", "d e")
