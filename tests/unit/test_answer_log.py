"""The answer log: runs and whole calls read back, as plain data and back, in time linear in the pieces."""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from openai_stream_protocol import ToolCall, ToolCallDelta
from openai_stream_server.answer_log import AnswerLog, fallback_call_id


def mixed_log() -> AnswerLog:
    """Text, call 0 (named on its first piece), text, call 1 (never named), call 0 again."""
    log = AnswerLog(prompt_tokens=5)
    log.append("Let me ")
    log.append("look. ", sent_at=12.5)
    log.append('{"city":', ToolCallDelta(0, "call_w", "weather"))
    log.append(' "Paris"}', ToolCallDelta(0))
    log.append("And ")
    log.append('{"q": 1}', ToolCallDelta(1))
    log.append("", ToolCallDelta(0))
    log.finish_reason, log.stop_sequence, log.completion_tokens = "tool_calls", None, 7
    return log


def test_text_calls_and_segments_of_a_mixed_answer() -> None:
    log = mixed_log()
    assert log.text == "Let me look. And "
    assert log.calls("chatcmpl-0123456789abcdef") == [
        ToolCall("call_w", "weather", '{"city": "Paris"}'),
        ToolCall(fallback_call_id("chatcmpl-0123456789abcdef", 1), "", '{"q": 1}'),
    ]
    assert fallback_call_id("chatcmpl-0123456789abcdef", 1) == "call_89abcdef_1"
    assert log.segments(0, len(log)) == [
        (None, "Let me look. ", 1),
        (ToolCallDelta(0, "call_w", "weather"), '{"city": "Paris"}', 3),
        (None, "And ", 4),
        (ToolCallDelta(1), '{"q": 1}', 5),
        (ToolCallDelta(0), "", 6),
    ]
    # A run that starts after a call's first piece carries no id or name: the renderer sent them already.
    assert log.segments(3, 5) == [(ToolCallDelta(0), ' "Paris"}', 3), (None, "And ", 4)]
    assert log.segments(2, 2) == []
    assert log.usage == {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12}
    assert log.nbytes == sum(len(p.encode()) for p in log.pieces)


def test_plain_data_round_trip_through_json() -> None:
    log = mixed_log()
    log.append("🚀")
    back = AnswerLog.from_dict(json.loads(json.dumps(log.to_dict())))
    assert back.to_dict() == log.to_dict()
    assert (back.text, back.calls("r"), back.segments(0, len(back)), back.usage, back.nbytes, back.sent_at) == (
        log.text,
        log.calls("r"),
        log.segments(0, len(log)),
        log.usage,
        log.nbytes,
        {1: 12.5},
    )
    assert back.finish_reason == "tool_calls" and back.held_bytes == log.held_bytes


def _argument_log(pieces: int) -> AnswerLog:
    log = AnswerLog()
    log.append("{", ToolCallDelta(0, "call_big", "f"))
    for _ in range(pieces - 1):
        log.append('"k": 1, ', ToolCallDelta(0))
    return log


def _best_of(read: Callable[[], object], repeats: int = 9) -> float:
    """The fastest of ``repeats`` reads, with the cyclic GC off: a collection landing in one read (the
    reads allocate) and a busy machine are noise; the best read is the cost of the work itself."""
    times = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            started = time.perf_counter()
            read()
            times.append(time.perf_counter() - started)
    finally:
        gc.enable()
    return min(times)


@pytest.mark.parametrize(
    "read, arguments",
    [
        pytest.param(lambda log: log.calls("r"), lambda calls: calls[0].arguments, id="calls"),
        pytest.param(lambda log: log.segments(0, len(log)), lambda runs: runs[0][1], id="segments"),
    ],
)
def test_reading_back_many_argument_pieces_is_linear(
    read: Callable[[AnswerLog], list[Any]], arguments: Callable[[list[Any]], str]
) -> None:
    """5x the pieces must cost about 5x, not 25x: joining by repeated concatenation (quadratic) made 10,000
    argument pieces of 400 B take seconds to read back, on the event loop, on every read of the answer.

    Linear work costs 5x for 5x the pieces, and cache effects alone push a linear read of 50,000 pieces a
    little past that, so the bound sits between linear (5x) and quadratic (25x): 10x.
    """
    small, large = _argument_log(10_000), _argument_log(50_000)
    assert len(read(large)) == 1 and arguments(read(large)) == "{" + '"k": 1, ' * 49_999
    ratio = _best_of(lambda: read(large)) / _best_of(lambda: read(small))
    assert ratio < 10, f"reading 50,000 pieces cost {ratio:.1f}x reading 10,000"
