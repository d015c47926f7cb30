"""Many requests at once on the tiny model: each answer as if alone, per-row cancel and errors, one message per step.

Greedy decoding on the tiny random model is deterministic, and neither
scheme changes its tokens here: continuous batching (text) and left-padded
``generate()`` (images) give exactly the ids of the same request served
alone (``QWENVL_MAX_BATCH=1``: one ``generate()`` of batch one, the old
path). So the texts are compared as they are.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from PIL import Image
from qwenvl_helpers import IMAGE, USER, cancel, check_no_flush, check_stream, png_data_uri, request, spy
from qwenvl_stream.engine import QwenEngine
from qwenvl_stream.generation import GenerationParams, IncrementalDetokenizer, StepRow
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings

from openai_stream_protocol import Chunk
from openai_stream_protocol.testing import RecordingNode, wait_for

pytestmark = pytest.mark.timeout(120)


def serve(engine: QwenEngine, events: Any, **settings: Any) -> RecordingNode:
    recorder = RecordingNode()
    scheduler = Scheduler(recorder, engine, Settings(model_name_or_path="tiny", **settings))
    scheduler.run(events(recorder) if callable(events) else events)
    return check_no_flush(recorder)


def token_messages(recorder: RecordingNode) -> list[list[dict[str, Any]]]:
    """The batch messages that carry text rows (not only finish rows)."""
    return [rows for rows in recorder.values() if any(not row["fin"] for row in rows)]


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


@dataclass(eq=False)
class Row:
    """A request as the engine sees it (the scheduler's ``Job`` has these fields)."""

    request_id: str
    texts: list[str]
    params: GenerationParams
    row_images: list[Any]
    halt: threading.Event = field(default_factory=threading.Event)
    continuation: Any = None


class StepCounter:
    """Counts the language model's forward calls (one per decode step of a batch, prefill included), optionally slowed.

    The delay makes a step long against the time a cancel takes to reach
    the engine, so "within two steps" is what is measured, not thread timing.
    """

    def __init__(self, loaded_model: Any, delay_s: float = 0.0) -> None:
        self.count = 0
        self.delay_s = delay_s
        self.hook = loaded_model.model.model.language_model.register_forward_pre_hook(self)

    def __call__(self, module: Any, args: Any) -> None:
        self.count += 1
        if self.delay_s:
            time.sleep(self.delay_s)

    def __enter__(self) -> StepCounter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.hook.remove()


RED, BLUE = png_data_uri((60, 40), (200, 0, 0)), png_data_uri((40, 60), (0, 0, 200))
# Decodes, but no processor accepts an aspect ratio of 400: it fails in the batch, at preparation.
THIN = png_data_uri((400, 1), (0, 0, 0))

SURVIVORS = {
    "img-red": [IMAGE + RED, USER + "What is it?"],
    "img-blue": [IMAGE + BLUE, USER + "Describe this picture"],
    "txt-a": [USER + "Hello there"],
    "txt-b": [USER + "Tell me a long story about the fox"],
}


def alone(loaded_model: Any, request_id: str, texts: list[str], max_tokens: int) -> list[Chunk]:
    engine = QwenEngine(loaded_model, Settings(model_name_or_path="tiny", max_batch=1))
    return serve(engine, [request(request_id, texts, max_tokens=max_tokens)], max_batch=1).chunks(request_id)


def test_six_at_once_each_answer_as_if_alone_a_cancel_within_two_steps_a_bad_image_alone(loaded_model: Any) -> None:
    torch.set_num_threads(1)
    engine = spy(loaded_model)
    at_cancel: dict[str, int] = {}

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        for request_id, texts in SURVIVORS.items():
            yield request(request_id, texts, max_tokens=24)
        yield request("bad-image", [IMAGE + THIN, USER + "What is it?"], max_tokens=24)
        yield request("cancelled", [USER + "Go on forever"], max_tokens=1000)
        if wait_for(lambda: len(recorder.chunks("cancelled")) >= 3, 30, interval_s=0.002):
            at_cancel["rows"] = len(recorder.chunks("cancelled"))
            at_cancel["tokens"] = engine.streams["cancelled"].count
        yield cancel("cancelled")

    with StepCounter(loaded_model, delay_s=0.005) as steps:
        recorder = serve(engine, events)
    assert at_cancel, "the cancelled request never got three chunks"

    for request_id, texts in SURVIVORS.items():
        batched = recorder.chunks(request_id)
        last = check_stream(batched)
        assert last.finish_reason == "length" and last.completion_tokens == 24
        reference = alone(loaded_model, request_id, texts, 24)
        assert text_of(batched) == text_of(reference), request_id
        assert last.prompt_tokens == check_stream(reference).prompt_tokens

    bad = check_stream(recorder.chunks("bad-image"))
    assert bad.finish_reason == "error" and "could not prepare the input" in bad.error
    assert [c.text for c in recorder.chunks("bad-image")] == [""]

    cancelled = recorder.chunks("cancelled")
    assert not any(c.fin for c in cancelled)
    assert len(cancelled) - at_cancel["rows"] <= 2  # rows sent after the cancel
    assert engine.streams["cancelled"].count - at_cancel["tokens"] <= 2  # tokens generated after it

    # Batching happened, and never more than one message per step (one row per request in each);
    # only finish rows (the bad image's error, a batch's last rows) travel outside a step.
    assert len(token_messages(recorder)) <= steps.count
    per_message = [[row["request_id"] for row in rows] for rows in recorder.values()]
    assert all(len(ids) == len(set(ids)) for ids in per_message)
    assert max(len(ids) for ids in per_message) >= 3


def test_a_cancel_masks_its_row_in_a_generate_batch_and_the_other_row_is_unchanged(loaded_model: Any) -> None:
    """The engine alone (no scheduler, so both rows surely share one ``generate()``): the halt is set from a step."""
    torch.set_num_threads(1)
    engine = spy(loaded_model)
    images = {"keep": [Image.new("RGB", (60, 40), (200, 0, 0))], "drop": [Image.new("RGB", (40, 60), (0, 0, 200))]}
    rows = {
        "keep": Row("keep", SURVIVORS["img-red"], GenerationParams(max_tokens=30), images["keep"]),
        "drop": Row("drop", SURVIVORS["img-blue"], GenerationParams(max_tokens=1000), images["drop"]),
    }
    steps: list[list[StepRow]] = []
    at_cancel: dict[str, int] = {}

    def on_step(step: list[StepRow]) -> None:
        steps.append(step)
        if len([r for s in steps for r in s if r.request_id == "drop"]) == 3 and not at_cancel:
            at_cancel["tokens"] = engine.streams["drop"].count
            rows["drop"].halt.set()  # what a cancel does

    with StepCounter(loaded_model) as forwards:
        engine.generate_batch(list(rows.values()), on_step)
    assert engine.streams["drop"].count - at_cancel["tokens"] <= 2
    # About 30 forwards for the 30 tokens of "keep" (31 were counted with images), not 1000: the masked row stopped.
    assert forwards.count <= 32
    keep = "".join(r.text for s in steps for r in s if r.request_id == "keep")
    assert keep == text_of(alone(loaded_model, "keep", SURVIVORS["img-red"], 30))
    ends = [r for s in steps for r in s if r.ended]
    assert [r.request_id for r in ends] == ["drop", "keep"]
    assert ends[1].outcome is not None and (ends[1].outcome.finish_reason, ends[1].outcome.completion_tokens) == ("length", 30)


def test_one_message_per_decode_step_in_a_generate_batch(loaded_model: Any) -> None:
    """Requests with a temperature of their own go through ``generate()``: three that wait together share one batch."""
    torch.set_num_threads(1)
    engine = spy(loaded_model)

    first_streaming: list[bool] = []

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("first", [USER + "Say something"], max_tokens=10, temperature=0)
        # The engine is busy with "first": the next three wait together, for the next batch.
        first_streaming.append(wait_for(lambda: bool(recorder.chunks("first")), 30))
        for i in range(3):
            yield request(f"r{i}", [USER + "Say something " * (i + 2)], max_tokens=10, temperature=0)

    with StepCounter(loaded_model, delay_s=0.005) as steps:
        recorder = serve(engine, events)
    assert first_streaming == [True], "the first request never streamed: the three did not wait behind it"
    assert steps.count == 20  # two generate() calls of 10 forwards each (prefill gives token 1)
    messages = token_messages(recorder)
    assert len(messages) <= steps.count
    assert all(len({row["request_id"] for row in values}) == len(values) for values in messages)
    assert sum(1 for values in messages if len(values) == 3) >= 5
    for request_id in ("first", "r0", "r1", "r2"):
        assert check_stream(recorder.chunks(request_id)).completion_tokens == 10


def test_incremental_detokenization_never_splits_a_character(loaded_model: Any) -> None:
    tokenizer = loaded_model.processor.tokenizer
    text = "héllo wörld ☃ 日本語 ok"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text.encode()) // 2  # multi-byte characters span several byte-level tokens
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.flush()]
    assert all("\ufffd" not in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == text
