"""dispatch_event: the one branching both bundled nodes use for their dora events."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import USER_TEXT_PREFIX, dispatch_event


class Handler:
    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    def on_request(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        self.calls.append(("request", texts, dict(metadata)))

    def on_cancel(self, request_id: str) -> None:
        self.calls.append(("cancel", request_id))

    def on_stop(self) -> None:
        self.calls.append(("stop",))


def event(kind: str, input_id: str | None = None, value: list[str] | None = None, **metadata: Any) -> dict[str, Any]:
    return {"type": kind, "id": input_id, "value": pa.array(value or [], type=pa.string()), "metadata": metadata}


@pytest.mark.parametrize("input_id", ["v1/chat/completions", "v1_chat_completions"])
def test_a_request_on_either_spelling_starts(input_id: str) -> None:
    handler = Handler()
    assert dispatch_event(event("INPUT", input_id, [USER_TEXT_PREFIX + "hi"], request_id="r1"), handler) is True
    assert handler.calls == [("request", [USER_TEXT_PREFIX + "hi"], {"request_id": "r1"})]


@pytest.mark.parametrize(
    "value, metadata, expected",
    [
        pytest.param(["r1"], {"request_id": "r1"}, [("cancel", "r1")], id="metadata"),
        pytest.param(["r2"], {}, [("cancel", "r2")], id="data-only"),
        pytest.param([], {}, [], id="names-nothing"),
    ],
)
def test_cancel_names_its_request(value: list[str], metadata: dict[str, Any], expected: list[tuple[Any, ...]]) -> None:
    handler = Handler()
    assert dispatch_event(event("INPUT", "cancel", value, **metadata), handler) is True
    assert handler.calls == expected


def test_stop_returns_false_and_other_events_are_ignored(caplog: pytest.LogCaptureFixture) -> None:
    handler = Handler()
    caplog.set_level(logging.DEBUG, logger="openai_stream_protocol")
    assert dispatch_event(event("INPUT", "tick", ["x"]), handler) is True
    assert dispatch_event({"type": "INPUT_CLOSED", "id": "cancel"}, handler) is True
    assert dispatch_event({"type": "ERROR", "error": "next: timed out"}, handler) is True
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert dispatch_event({"type": "ERROR", "error": "boom"}, handler) is True
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["dora error event: boom"]
    assert handler.calls == []
    assert dispatch_event({"type": "STOP"}, handler) is False
    assert handler.calls == [("stop",)]
