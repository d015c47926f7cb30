"""The event loop with a fake engine: queueing, cancel, STOP, errors, stop strings, image prefetch (no torch needed)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from PIL import Image
from qwenvl_helpers import (
    TRUNCATED_PNG_WITH_A_NEWLINE,
    LocalServer,
    Waits,
    bomb_png_data_uri,
    cancel,
    check_no_flush,
    check_stream,
    image_data_uri,
    png_bytes,
    png_data_uri,
    request,
    serve_bytes,
)
from qwenvl_stream.generation import GenerationParams, Outcome, RequestError
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings

from openai_stream_protocol import Heartbeat
from openai_stream_protocol.testing import RecordingNode

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
        self.images: dict[str, list[Any]] = {}

    def generate(
        self,
        texts: list[str],
        params: GenerationParams,
        emit: Callable[[str], None],
        halt: threading.Event,
        *,
        images: Sequence[Any] = (),
    ) -> Outcome:
        self.calls.append(texts)
        self.images[texts[0]] = list(images)
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


def run(engine: FakeEngine, events: Any, **settings: Any) -> RecordingNode:
    recorder = RecordingNode()
    Scheduler(recorder, engine, Settings(**settings)).run(events if not callable(events) else events(recorder))
    return check_no_flush(recorder)


def test_pieces_become_numbered_chunks_then_the_finish_marker() -> None:
    recorder = run(FakeEngine(["Hello", " there", ",", " friend"]), [request("r1", [USER + "hi"], max_tokens=50)])
    chunks = recorder.chunks("r1")
    last = check_stream(chunks)
    assert [c.text for c in chunks] == ["Hello", " there", ",", " friend", ""]
    assert last.finish_reason == "stop" and last.prompt_tokens == 3 and last.completion_tokens == 4
    assert all(sent.output_id == "chunks" for sent in recorder.sent)
    assert len(recorder.sent) == len(chunks)  # one request, one row per message


def test_max_tokens_gives_length() -> None:
    last = check_stream(run(FakeEngine(["a"] * 10), [request("r1", [USER + "hi"], max_tokens=4)]).chunks("r1"))
    assert last.finish_reason == "length" and last.completion_tokens == 4


def test_stop_string_is_cut_out_and_halts_the_generation() -> None:
    engine = FakeEngine(["hello ", "wor", "ld E", "ND and", " more", " and more"])
    recorder = run(engine, [request("r1", [USER + "hi"], stop=["END"])])
    chunks = recorder.chunks("r1")
    assert "".join(c.text for c in chunks) == "hello world "
    last = check_stream(chunks)
    assert (last.finish_reason, last.stop_sequence) == ("stop", "END")
    assert engine.emitted[USER + "hi"] < 6


def test_an_answer_no_stop_string_ended_names_none() -> None:
    recorder = run(FakeEngine(["hello ", "world"]), [request("r1", [USER + "hi"], stop=["END"])])
    last = check_stream(recorder.chunks("r1"))
    assert last.finish_reason == "stop" and last.stop_sequence is None


def test_the_hub_input_spelling_is_accepted_and_other_inputs_ignored() -> None:
    event = request("r1", [USER + "hi"])
    events = [{**event, "id": "tick"}, {**event, "id": "v1_chat_completions"}]
    assert check_stream(run(FakeEngine(["x"]), events).chunks("r1")).finish_reason == "stop"


def test_a_request_without_an_id_is_dropped_and_bad_parameters_answer_an_error() -> None:
    nameless = request("r0", [USER + "hi"])
    nameless["metadata"] = {"model": "m"}
    recorder = run(FakeEngine(["x"]), [nameless, request("r1", [USER + "hi"], temperature=-2)])
    assert [c.request_id for c in recorder.chunks()] == ["r1"]
    last = check_stream(recorder.chunks("r1"))
    assert last.finish_reason == "error" and "temperature" in last.error


@pytest.mark.parametrize(
    "error, message",
    [
        pytest.param(RequestError("could not decode image x"), "could not decode image x", id="request-error"),
        pytest.param(RuntimeError("CUDA went away"), "generation failed: CUDA went away", id="internal-error"),
    ],
)
def test_engine_errors_end_the_request_and_the_node_keeps_serving(error: Exception, message: str) -> None:
    waits = Waits()
    engine = FakeEngine(["ok"], error=error)

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("bad", [USER + "hi"])
        waits(lambda: bool(recorder.chunks("bad")), "the error of bad")
        engine.error = None
        yield request("good", [USER + "hi"])

    recorder = run(engine, events)
    assert waits.missed == []
    bad = check_stream(recorder.chunks("bad"))
    assert bad.finish_reason == "error" and bad.error == message
    assert check_stream(recorder.chunks("good")).finish_reason == "stop"


def test_cancel_stops_the_generation_in_flight_and_sends_nothing_more() -> None:
    waits = Waits()
    engine = FakeEngine(["tok "] * 1000, delay_s=0.005)

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("r1", ["first"], max_tokens=1000)
        waits(lambda: len(recorder.chunks("r1")) >= 3, "three chunks of r1")
        yield cancel("r1")
        yield request("r2", ["second"], max_tokens=2)

    recorder = run(engine, events)
    assert waits.missed == []
    assert not any(c.fin for c in recorder.chunks("r1"))
    assert engine.emitted["first"] < 100
    assert check_stream(recorder.chunks("r2")).finish_reason == "length"


def test_requests_wait_in_a_bounded_queue_and_a_full_queue_answers_an_error() -> None:
    waits = Waits()
    engine = FakeEngine(["tok "] * 1000, delay_s=0.005)

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("r1", ["first"], max_tokens=1000)
        yield request("r2", ["second"], max_tokens=3)
        yield request("r3", ["third"], max_tokens=3)
        yield request("r4", ["fourth"], max_tokens=3)
        waits(lambda: bool(recorder.chunks("r4")), "r4 refused")
        yield cancel("r3")  # cancelled while waiting: never generated
        yield cancel("r1")

    recorder = run(engine, events, max_queued_requests=2)
    assert waits.missed == []
    refused = check_stream(recorder.chunks("r4"))
    assert refused.finish_reason == "error" and "busy" in refused.error
    assert refused.is_busy  # error_code busy: the server may send it to another replica
    assert check_stream(recorder.chunks("r2")).completion_tokens == 3
    assert recorder.chunks("r3") == []
    assert [call[0] for call in engine.calls] == ["first", "second"]


def test_stop_drops_everything_and_returns_promptly() -> None:
    waits = Waits()
    engine = FakeEngine(["tok "] * 10_000, delay_s=0.005)

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("r1", ["first"], max_tokens=10_000)
        yield request("r2", ["second"])
        waits(lambda: bool(recorder.chunks("r1")), "a chunk of r1")
        yield {"type": "STOP", "id": "STOP"}

    started = time.monotonic()
    recorder = run(engine, events)
    assert waits.missed == []
    assert time.monotonic() - started < 5
    assert not any(c.fin for c in recorder.chunks("r1")) and recorder.chunks("r2") == []
    assert [call[0] for call in engine.calls] == ["first"]


def test_when_events_end_queued_requests_are_still_answered() -> None:
    recorder = run(FakeEngine(["a", "b"]), [request(f"r{i}", [USER + "hi"]) for i in range(3)])
    for i in range(3):
        assert check_stream(recorder.chunks(f"r{i}")).finish_reason == "stop"


IMAGE = "<|user|>\n<|vision_start|>\n"


class BlockedImage:
    """A route that answers a PNG only once ``release`` is set (bounded: it gives up after 30 s)."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.release = threading.Event()

    def __call__(self, handler: Any) -> None:
        self.started.set()
        if self.release.wait(30):
            serve_bytes(png_bytes((16, 16)))(handler)


def finished(recorder: RecordingNode, request_id: str) -> bool:
    return any(c.fin for c in recorder.chunks(request_id))


def reached(event: threading.Event, seen: list[str], what: str) -> bool:
    """Waits (bounded) and notes what did not happen: the reader thread would swallow an assert."""
    if not event.wait(10):
        seen.append(f"{what}: timed out")
        return False
    return True


def test_a_slow_image_server_does_not_stall_a_text_request_queued_behind_it() -> None:
    waits = Waits()
    engine = FakeEngine(["a", "b"])
    slow = BlockedImage()
    seen: list[str] = []
    with LocalServer() as server:
        server.routes["/slow.png"] = slow

        def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
            yield request("img", [IMAGE + server.url("/slow.png"), USER + "what is it?"])
            if reached(slow.started, seen, "image fetch started"):
                yield request("txt", [USER + "hi"])
                waits(lambda: finished(recorder, "txt"), "txt finished")
                # The text request is answered while the image's server still holds the fetch.
                seen.append(f"txt done; image released={slow.release.is_set()} image chunks={len(recorder.chunks('img'))}")
            slow.release.set()

        try:
            recorder = run(engine, events, allow_private_urls=True, image_timeout_s=30)
        finally:
            slow.release.set()
    assert waits.missed == []
    assert seen == ["txt done; image released=False image chunks=0"]
    assert check_stream(recorder.chunks("txt")).finish_reason == "stop"
    assert check_stream(recorder.chunks("img")).finish_reason == "stop"
    assert [call[0] for call in engine.calls] == [USER + "hi", IMAGE + server.url("/slow.png")]
    assert [image.size for image in engine.images[IMAGE + server.url("/slow.png")]] == [(16, 16)]


def test_a_refused_image_ends_its_request_without_taking_the_generation_slot() -> None:
    engine = FakeEngine(["ok"])
    bad = IMAGE + "http://127.0.0.1:9/secret.png"
    recorder = run(engine, [request("bad", [bad, USER + "?"]), request("good", [USER + "hi"])])
    last = check_stream(recorder.chunks("bad"))
    assert last.finish_reason == "error" and last.error == "image URL not allowed"
    assert check_stream(recorder.chunks("good")).finish_reason == "stop"
    assert [call[0] for call in engine.calls] == [USER + "hi"]  # the refused request never reached the engine


def test_cancel_while_its_images_are_fetched_drops_the_request() -> None:
    waits = Waits()
    engine = FakeEngine(["a"])
    slow = BlockedImage()
    seen: list[str] = []
    with LocalServer() as server:
        server.routes["/slow.png"] = slow

        def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
            yield request("img", [IMAGE + server.url("/slow.png"), USER + "what is it?"])
            reached(slow.started, seen, "image fetch started")
            yield cancel("img")
            yield request("txt", [USER + "hi"])
            waits(lambda: finished(recorder, "txt"), "txt finished")
            slow.release.set()

        try:
            recorder = run(engine, events, allow_private_urls=True, image_timeout_s=30)
        finally:
            slow.release.set()
    assert waits.missed == []
    assert seen == []
    assert recorder.chunks("img") == []
    assert [call[0] for call in engine.calls] == [USER + "hi"]


def test_requests_still_fetching_count_against_the_queue_bound() -> None:
    waits = Waits()
    engine = FakeEngine(["a"])
    slow = BlockedImage()
    with LocalServer() as server:
        server.routes["/slow.png"] = slow
        image = IMAGE + server.url("/slow.png")

        def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
            yield request("i1", [image])
            yield request("i2", [image])
            yield request("i3", [image])
            waits(lambda: finished(recorder, "i3"), "i3 refused")
            slow.release.set()

        try:
            recorder = run(engine, events, allow_private_urls=True, image_timeout_s=30, max_queued_requests=2)
        finally:
            slow.release.set()
    refused = check_stream(recorder.chunks("i3"))
    assert waits.missed == []
    assert refused.finish_reason == "error" and "busy" in refused.error and refused.is_busy
    assert check_stream(recorder.chunks("i1")).finish_reason == "stop"
    assert check_stream(recorder.chunks("i2")).finish_reason == "stop"


def test_a_generation_with_no_output_for_the_streamer_timeout_fails_and_is_halted() -> None:
    waits = Waits()

    class SilentEngine(FakeEngine):
        """Produces nothing until halted (bounded: gives up after 10 s)."""

        def generate(self, texts: list[str], params: GenerationParams, emit: Any, halt: threading.Event, **kw: Any) -> Outcome:
            self.calls.append(texts)
            self.emitted[texts[0]] = int(halt.wait(10))
            return Outcome("stop", 3, 0)

    engine = SilentEngine([])

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("stuck", [USER + "hi"])
        waits(lambda: finished(recorder, "stuck"), "stuck failed")
        yield request("next", [USER + "hi"])

    recorder = run(engine, events, streamer_timeout_s=0.3)
    assert waits.missed == []
    stuck = check_stream(recorder.chunks("stuck"))
    assert stuck.finish_reason == "error" and "QWENVL_STREAMER_TIMEOUT_S" in stuck.error
    assert engine.emitted[USER + "hi"] == 1  # its generation saw the halt
    assert check_stream(recorder.chunks("next")).finish_reason == "error"  # the same silent engine


# -- what one request's images may cost ------------------------------------------------------------


def image_error(recorder: RecordingNode, request_id: str) -> str:
    last = check_stream(recorder.chunks(request_id))
    assert last.finish_reason == "error"
    return str(last.error)


def test_a_request_with_too_many_images_ends_with_an_error_naming_the_limit() -> None:
    engine = FakeEngine(["ok"])
    images = [IMAGE + png_data_uri((8, 8))] * 4
    recorder = run(
        engine, [request("many", [*images, USER + "?"]), request("few", [*images[:3], USER + "?"])], max_images_per_request=3
    )
    assert image_error(recorder, "many") == "too many images: 4 in one request, at most 3 allowed (QWENVL_MAX_IMAGES_PER_REQUEST)"
    assert check_stream(recorder.chunks("few")).finish_reason == "stop"
    assert [len(images) for images in engine.images.values()] == [3]  # only "few" reached the engine


def test_a_request_over_the_total_pixels_ends_before_any_image_is_decoded() -> None:
    engine = FakeEngine(["ok"])
    bomb = IMAGE + bomb_png_data_uri((2048, 2048))  # 4 Mi pixels each, within the per-image limit
    settings = {"max_image_pixels": 2048 * 2048, "max_total_image_pixels": 3 * 2048 * 2048}
    recorder = run(engine, [request("bombs", [bomb] * 4 + [USER + "?"])], **settings)
    assert image_error(recorder, "bombs") == (
        "the request's images have more than the 12582912 pixels allowed in all "
        "(QWENVL_MAX_TOTAL_IMAGE_PIXELS): image 4 passes it"
    )
    assert engine.calls == []


@pytest.mark.parametrize(
    "image, error",
    [
        pytest.param(
            image_data_uri(Image.new("RGB", (16, 16)), "TIFF"),
            "could not decode image 1: not a known image format (PNG, JPEG, WebP, GIF or BMP)",
            id="tiff-refused",
        ),
        pytest.param(
            TRUNCATED_PNG_WITH_A_NEWLINE, "could not decode image 1: the data is damaged or incomplete", id="truncated-png"
        ),
    ],
)
def test_an_image_error_is_a_fixed_text_and_every_log_line_stays_one_line(
    image: str, error: str, caplog: pytest.LogCaptureFixture
) -> None:
    engine = FakeEngine(["ok"])
    with caplog.at_level(logging.DEBUG, logger="qwenvl_stream"):
        recorder = run(
            engine, [request("bad", [IMAGE + image, USER + "?"]), request("good", [IMAGE + png_data_uri(), USER + "?"])]
        )
    forged = [record.getMessage() for record in caplog.records if "\n" in record.getMessage()]
    assert caplog.records and forged == []
    assert image_error(recorder, "bad") == error
    assert check_stream(recorder.chunks("good")).finish_reason == "stop"


# -- heartbeats (docs/architecture.md, "Hello and heartbeat") -------------------------------------------


def test_heartbeats_flow_while_requests_are_held_and_one_says_when_idle() -> None:
    engine = FakeEngine(["tok "] * 20, delay_s=0.01)
    recorder = RecordingNode()
    heartbeat = Heartbeat(recorder, "qwen-1", interval_s=0.02, can_continue=True)
    Scheduler(recorder, engine, Settings(), heartbeat=heartbeat).run(
        [request("r1", ["first"], max_tokens=20), request("r2", ["second"], max_tokens=20)]
    )
    beats = [s for s in recorder.statuses() if s.kind == "heartbeat"]
    # Two answers of 20 pieces at 10 ms, one after the other (batches of one): 400 ms or more, a beat every 20 ms.
    assert len(beats) >= 3 and all(b.can_continue and b.node_id == "qwen-1" for b in beats)
    assert max(b.active or 0 for b in beats) == 1 and beats[-1].active == 0 and beats[-1].queued == 0
    sent = recorder.sent
    chunk_at = [i for i, s in enumerate(sent) if not s.is_status]
    assert any(s.is_status for s in sent[chunk_at[0] : chunk_at[-1]]), "no heartbeat while the answers streamed"
    assert check_stream(recorder.chunks("r1")).completion_tokens == 20
    assert check_stream(recorder.chunks("r2")).completion_tokens == 20


def test_without_a_heartbeat_nothing_but_chunks_is_sent() -> None:
    recorder = run(FakeEngine(["a ", "b "], delay_s=0.01), [request("r1", ["x"], max_tokens=5)])
    assert recorder.statuses() == [] and check_stream(recorder.chunks("r1")).finish_reason == "stop"
