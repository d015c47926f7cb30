"""Step mode (``ECHO_STEP_MS``): one batch message per step, holding every active request's next chunk."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from echo_stream.settings import Settings
from echo_stream.step import StepEcho

from openai_stream_protocol import USER_TEXT_PREFIX, Chunk, is_batch, parse_batch
from openai_stream_protocol.testing import RecordingNode

STEP = Settings(token_delay_s=0, step_ms=10)


def batches(recorder: RecordingNode) -> list[list[Chunk]]:
    """Each message's chunks; every message must be a batch on ``chunks``, without ``flush``."""
    assert all(sent.output_id == "chunks" and is_batch(sent.data) and "flush" not in sent.metadata for sent in recorder.sent)
    return [parse_batch(sent.data) for sent in recorder.sent]


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def request(request_id: str, text: str, **metadata: Any) -> dict[str, Any]:
    meta = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, "max_tokens": 0, **metadata}
    return {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array([USER_TEXT_PREFIX + text]), "metadata": meta}


def cancel(request_id: str) -> dict[str, Any]:
    return {"type": "INPUT", "id": "cancel", "value": pa.array([request_id]), "metadata": {"request_id": request_id}}


def steps(echo: StepEcho, clock: Clock, limit: int = 100) -> None:
    """Step until nothing is active (bounded)."""
    for _ in range(limit):
        due = echo.step(clock.now)
        if due is None:
            return
        clock.now = due
    raise AssertionError("still active after the step limit")


def test_each_step_is_one_message_with_every_active_request() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = StepEcho(recorder, STEP, clock=clock)
    echo.handle(request("a", "a1 a2 a3"))
    echo.handle(request("b", "b1 b2"))
    assert echo.step(0.0) == pytest.approx(0.01) and recorder.sent == []  # the first step is one step away
    steps(echo, clock)
    assert [[(c.request_id, c.seq, c.fin) for c in m] for m in batches(recorder)] == [
        [("a", 0, False), ("b", 0, False)],
        [("a", 1, False), ("b", 1, True)],
        [("a", 2, True)],
    ]
    assert recorder.text("a") == "a1 a2 a3" and recorder.text("b") == "b1 b2"
    last = recorder.chunks("a")[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", 3, 3)
    assert echo.active == {} and echo.steps == 3


def test_stop_strings_max_tokens_and_tokens_per_chunk_as_in_the_normal_mode() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = StepEcho(recorder, Settings(token_delay_s=0, step_ms=5, tokens_per_chunk=2), clock=clock)
    echo.handle(request("cut", "one two STOP three", stop=["STOP"]))
    echo.handle(request("len", "w1 w2 w3 w4 w5", max_tokens=3))
    steps(echo, clock)
    assert [c.text for c in recorder.chunks("cut")] == ["one two", " "]
    assert (recorder.chunks("cut")[-1].finish_reason, recorder.chunks("cut")[-1].stop_sequence) == ("stop", "STOP")
    assert [c.stop_sequence for c in recorder.chunks("cut")[:-1]] == [None]
    assert [c.text for c in recorder.chunks("len")] == ["w1 w2", " w3"]
    assert recorder.chunks("len")[-1].finish_reason == "length" and recorder.chunks("len")[-1].completion_tokens == 3
    assert recorder.chunks("len")[-1].stop_sequence is None


def test_a_non_streaming_request_is_one_row() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = StepEcho(recorder, STEP, clock=clock)
    echo.handle(request("r", "one two three", stream=False))
    steps(echo, clock)
    (chunk,) = recorder.chunks("r")
    assert chunk.text == "one two three" and chunk.fin


def test_cancel_drops_the_request_and_its_queued_rows() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = StepEcho(recorder, STEP, clock=clock)
    echo.handle(request("a", "a1 a2 a3"))
    echo.handle(request("b", "b1 b2 b3"))
    clock.now = echo.step(0.0) or 0.0
    echo.step(clock.now)  # step 1: a1, b1
    echo.handle(cancel("a"))
    echo.handle(cancel("unknown"))
    steps(echo, clock)
    assert [c.text for c in recorder.chunks("a")] == ["a1"] and not any(c.fin for c in recorder.chunks("a"))
    assert recorder.text("b") == "b1 b2 b3" and recorder.chunks("b")[-1].fin


def test_a_request_joining_between_steps_starts_at_the_next_step() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = StepEcho(recorder, STEP, clock=clock)
    echo.handle(request("a", "a1 a2 a3"))
    clock.now = 0.01
    echo.step(clock.now)
    clock.now = 0.015
    echo.handle(request("b", "b1"))
    assert echo.step(clock.now) == pytest.approx(0.02)
    clock.now = 0.02
    echo.step(clock.now)
    assert [(c.request_id, c.seq) for c in batches(recorder)[-1]] == [("a", 1), ("b", 0)]


def test_run_serves_a_list_of_events_to_the_end() -> None:
    recorder = RecordingNode()
    StepEcho(recorder, Settings(token_delay_s=0, step_ms=0.5, stamp=True)).run(
        [request(f"r{i}", f"x{i} y{i}") for i in range(20)]
    )
    assert all(recorder.text(f"r{i}") == f"x{i} y{i}" for i in range(20))
    assert len(batches(recorder)) == 2  # two tokens each: two steps, every request in each
    assert all(c.sent_at is not None for m in batches(recorder) for c in m)


@pytest.mark.parametrize("value", ["-1", "fast", "60001"])
def test_bad_step_names_the_variable(value: str) -> None:
    with pytest.raises(ValueError, match="ECHO_STEP_MS"):
        Settings.from_env({"ECHO_STEP_MS": value})


def test_step_from_env() -> None:
    assert Settings.from_env({"ECHO_STEP_MS": "20"}).step_ms == 20.0
    assert Settings.from_env({}).step_ms == 0.0
