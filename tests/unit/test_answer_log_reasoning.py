"""Reasoning pieces in the answer log: their own kind of run, kept apart from the answer text, as plain data and back."""

from __future__ import annotations

import json

from openai_stream_protocol import Chunk, ToolCallDelta
from openai_stream_server.answer_log import REASONING, AnswerLog
from openai_stream_server.state import StreamState


def thinking_log() -> AnswerLog:
    log = AnswerLog(prompt_tokens=3)
    log.append("Let me ", reasoning=True)
    log.append("", reasoning=True)
    log.append("think.", reasoning=True)
    log.append("Sure: ")
    log.append('{"a": 1}', ToolCallDelta(0, "call_a", "f"))
    log.append("hmm", reasoning=True)
    log.append("done")
    return log


def test_reasoning_is_neither_text_nor_a_call() -> None:
    log = thinking_log()
    assert log.reasoning == {0, 1, 2, 5}
    assert log.text == "Sure: done"
    assert log.reasoning_text == "Let me think.hmm"
    assert [call.arguments for call in log.calls("r")] == ['{"a": 1}']
    assert log.segments(0, len(log)) == [
        (REASONING, "Let me think.", 2),
        (None, "Sure: ", 3),
        (ToolCallDelta(0, "call_a", "f"), '{"a": 1}', 4),
        (REASONING, "hmm", 5),
        (None, "done", 6),
    ]
    assert log.segments(2, 4) == [(REASONING, "think.", 2), (None, "Sure: ", 3)]


def test_reasoning_tokens_are_the_nodes_count_else_the_reasoning_pieces_with_text() -> None:
    log = thinking_log()
    assert log.reasoning_used == 3 and log.counted_tokens == 6
    log.reasoning_tokens = 40
    assert log.reasoning_used == 40


def test_plain_data_round_trip_keeps_the_kinds() -> None:
    log = thinking_log()
    log.reasoning_tokens = 7
    back = AnswerLog.from_dict(json.loads(json.dumps(log.to_dict())))
    assert back.to_dict() == log.to_dict()
    assert (back.reasoning_text, back.text, back.reasoning_used, back.segments(0, len(back))) == (
        log.reasoning_text,
        log.text,
        7,
        log.segments(0, len(log)),
    )
    assert AnswerLog.from_dict({"pieces": ["a"]}).reasoning == set()  # a record written before reasoning existed


def test_a_state_takes_the_kind_and_the_count_from_its_chunks() -> None:
    state = StreamState("chatcmpl-1", "m", "chat")
    state.accept(Chunk("chatcmpl-1", 1, "answer"), 0.0)  # early: held, then appended with its kind
    state.accept(Chunk("chatcmpl-1", 0, "thought", reasoning=True), 0.0)
    state.accept(Chunk("chatcmpl-1", 2, "", fin=True, finish_reason="stop", reasoning_tokens=1), 0.0)
    assert (state.log.reasoning_text, state.log.text, state.log.reasoning_used) == ("thought", "answer", 1)
