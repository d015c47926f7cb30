"""The event loop with a fake engine: queueing, cancel, STOP, errors, stop strings (no torch needed)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from qwenvl_helpers import Recorder, cancel, check_stream, request
from qwenvl_stream.generation import GenerationParams, Outcome, RequestError
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings

pytestmark = pytest.mark.timeout(60)

USER = "<|user|>\n<|im_start|>\n"


class FakeEngine:
    """Emits ``pieces`` one by one, ``delay_s`` apart, and stops when ``halt`` is set."""

    def __init__(self, pieces: list[str], *, delay_s: float = 0.0, error: Exception | None = None) -> None:
        self.pieces = pieces
        self.delay_s = delay_s
        self.error = error
        self.calls: list[list[str]] = []
        self.emitted: dict[str, int] = {}

    def generate(self, texts: list[str], params: GenerationParams, emit: Callable[[str], None], halt: threading.Event) -> Outcome:
        self.calls.append(texts)
        if self.error is not None:
            raise self.error
        count = 0
        for piece in self.pieces[: params.max_tokens]:
            if halt.is_set():
                break
            time.sleep(self.delay_s)
            emit(piece)
            count += 1
        self.emitted[texts[0]] = count
        reason = "length" if count == params.max_tokens and count < len(self.pieces) else "stop"
        return Outcome(reason, 3, count)


def wait_for(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.005)


def run(engine: FakeEngine, events: Any, **settings: Any) -> Recorder:
    recorder = Recorder()
    Scheduler(recorder, engine, Settings(**settings)).run(events if not callable(events) else events(recorder))
    return recorder


def test_pieces_become_numbered_chunks_then_the_finish_marker() -> None:
    recorder = run(FakeEngine(["Hello", " there", ",", " friend"]), [request("r1", [USER + "hi"], max_tokens=50)])
    chunks = recorder.chunks("r1")
    last = check_stream(chunks)
    assert [text for text, _ in chunks] == ["Hello", " there", ",", " friend", ""]
    assert last["finish_reason"] == "stop" and last["prompt_tokens"] == 3 and last["completion_tokens"] == 4
    assert all(output == "chunks" for output, _, _ in recorder.messages)


def test_max_tokens_gives_length() -> None:
    last = check_stream(run(FakeEngine(["a"] * 10), [request("r1", [USER + "hi"], max_tokens=4)]).chunks("r1"))
    assert last["finish_reason"] == "length" and last["completion_tokens"] == 4


def test_stop_string_is_cut_out_and_halts_the_generation() -> None:
    engine = FakeEngine(["hello ", "wor", "ld E", "ND and", " more", " and more"])
    recorder = run(engine, [request("r1", [USER + "hi"], stop=["END"])])
    chunks = recorder.chunks("r1")
    assert "".join(text for text, _ in chunks) == "hello world "
    assert check_stream(chunks)["finish_reason"] == "stop"
    assert engine.emitted[USER + "hi"] < 6


def test_the_hub_input_spelling_is_accepted_and_other_inputs_ignored() -> None:
    event = request("r1", [USER + "hi"])
    events = [{**event, "id": "tick"}, {**event, "id": "v1_chat_completions"}]
    assert check_stream(run(FakeEngine(["x"]), events).chunks("r1"))["finish_reason"] == "stop"


def test_a_request_without_an_id_is_dropped_and_bad_parameters_answer_an_error() -> None:
    nameless = request("r0", [USER + "hi"])
    nameless["metadata"] = {"model": "m"}
    recorder = run(FakeEngine(["x"]), [nameless, request("r1", [USER + "hi"], temperature=-2)])
    assert [md.get("request_id") for _, _, md in recorder.messages] == ["r1"]
    last = check_stream(recorder.chunks("r1"))
    assert last["finish_reason"] == "error" and "temperature" in last["error"]


@pytest.mark.parametrize(
    "error, message",
    [
        pytest.param(RequestError("could not decode image x"), "could not decode image x", id="request-error"),
        pytest.param(RuntimeError("CUDA went away"), "generation failed: CUDA went away", id="internal-error"),
    ],
)
def test_engine_errors_end_the_request_and_the_node_keeps_serving(error: Exception, message: str) -> None:
    engine = FakeEngine(["ok"], error=error)

    def events(recorder: Recorder) -> Iterator[dict[str, Any]]:
        yield request("bad", [USER + "hi"])
        wait_for(lambda: bool(recorder.chunks("bad")))
        engine.error = None
        yield request("good", [USER + "hi"])

    recorder = run(engine, events)
    bad = check_stream(recorder.chunks("bad"))
    assert bad["finish_reason"] == "error" and bad["error"] == message
    assert check_stream(recorder.chunks("good"))["finish_reason"] == "stop"


def test_cancel_stops_the_generation_in_flight_and_sends_nothing_more() -> None:
    engine = FakeEngine(["tok "] * 1000, delay_s=0.005)

    def events(recorder: Recorder) -> Iterator[dict[str, Any]]:
        yield request("r1", ["first"], max_tokens=1000)
        wait_for(lambda: len(recorder.chunks("r1")) >= 3)
        yield cancel("r1")
        yield request("r2", ["second"], max_tokens=2)

    recorder = run(engine, events)
    assert not any(md.get("fin") for _, md in recorder.chunks("r1"))
    assert engine.emitted["first"] < 100
    assert check_stream(recorder.chunks("r2"))["finish_reason"] == "length"


def test_requests_wait_in_a_bounded_queue_and_a_full_queue_answers_an_error() -> None:
    engine = FakeEngine(["tok "] * 1000, delay_s=0.005)

    def events(recorder: Recorder) -> Iterator[dict[str, Any]]:
        yield request("r1", ["first"], max_tokens=1000)
        yield request("r2", ["second"], max_tokens=3)
        yield request("r3", ["third"], max_tokens=3)
        yield request("r4", ["fourth"], max_tokens=3)
        wait_for(lambda: bool(recorder.chunks("r4")))
        yield cancel("r3")  # cancelled while waiting: never generated
        yield cancel("r1")

    recorder = run(engine, events, max_queued_requests=2)
    refused = check_stream(recorder.chunks("r4"))
    assert refused["finish_reason"] == "error" and "busy" in refused["error"]
    assert check_stream(recorder.chunks("r2"))["completion_tokens"] == 3
    assert recorder.chunks("r3") == []
    assert [call[0] for call in engine.calls] == ["first", "second"]


def test_stop_drops_everything_and_returns_promptly() -> None:
    engine = FakeEngine(["tok "] * 10_000, delay_s=0.005)

    def events(recorder: Recorder) -> Iterator[dict[str, Any]]:
        yield request("r1", ["first"], max_tokens=10_000)
        yield request("r2", ["second"])
        wait_for(lambda: bool(recorder.chunks("r1")))
        yield {"type": "STOP", "id": "STOP"}

    started = time.monotonic()
    recorder = run(engine, events)
    assert time.monotonic() - started < 5
    assert not any(md.get("fin") for _, md in recorder.chunks("r1")) and recorder.chunks("r2") == []
    assert [call[0] for call in engine.calls] == ["first"]


def test_when_events_end_queued_requests_are_still_answered() -> None:
    recorder = run(FakeEngine(["a", "b"]), [request(f"r{i}", [USER + "hi"]) for i in range(3)])
    for i in range(3):
        assert check_stream(recorder.chunks(f"r{i}"))["finish_reason"] == "stop"
