"""What echo-stream does for failover: continue another replica's answer, heartbeats, busy and the exit directive.

docs/architecture.md, "Continuation", "Hello and heartbeat" and "Busy". A continued
answer is checked against an uninterrupted one: the delivered pieces plus what the
node sends must be that answer, word for word, numbered on from ``continue_from``.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pytest
from echo_stream.engine import EchoStream
from echo_stream.settings import Settings
from echo_stream.step import StepEcho

from openai_stream_protocol import (
    USER_TEXT_PREFIX,
    Chunk,
    Continuation,
    Heartbeat,
    ToolCallDelta,
    encode_tools,
)
from openai_stream_protocol.testing import RecordingNode

FAST = Settings(token_delay_s=0)
STEP = Settings(token_delay_s=0, step_ms=1)
TEXT = "the quick  brown fox\njumps over the lazy dog"


def request(request_id: str, text: str = TEXT, **metadata: Any) -> dict[str, Any]:
    meta = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, **metadata}
    return {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array([USER_TEXT_PREFIX + text]), "metadata": meta}


def engine(settings: Settings, node: RecordingNode, **kwargs: Any) -> EchoStream:
    return StepEcho(node, settings, **kwargs) if settings.step_ms else EchoStream(node, settings, **kwargs)


def serve(events: list[dict[str, Any]], settings: Settings = FAST, **kwargs: Any) -> RecordingNode:
    node = RecordingNode()
    engine(settings, node, **kwargs).run(events)
    return node


def numbered(chunks: list[Chunk], first: int) -> list[Chunk]:
    """The chunks are numbered ``first``, ``first + 1``, ... and only the last one finishes."""
    assert [c.seq for c in chunks] == list(range(first, first + len(chunks)))
    assert [c.fin for c in chunks] == [False] * (len(chunks) - 1) + [True]
    return chunks


def pieces_of(chunks: list[Chunk]) -> list[tuple[str, ToolCallDelta | None]]:
    return [(c.text, c.tool_call) for c in chunks]


MODES = [
    pytest.param(FAST, id="per-token"),
    pytest.param(Settings(token_delay_s=0, tokens_per_chunk=3), id="three-per-chunk"),
    pytest.param(STEP, id="step"),
]


@pytest.mark.parametrize("settings", MODES)
@pytest.mark.parametrize("cut", [1, 4, 8])
def test_a_continued_echo_is_the_rest_of_the_uninterrupted_one_word_for_word(settings: Settings, cut: int) -> None:
    whole = numbered(serve([request("r")], settings).chunks("r"), 0)
    cut = min(cut, len(whole) - 1)  # three tokens per chunk make 4 chunks
    delivered = whole[:cut]  # what the client had when the first replica died
    continued = Continuation.of(pieces_of(delivered)).to_metadata()
    rest = numbered(serve([request("r~1", **continued)], settings).chunks("r~1"), cut)
    assert "".join(c.text for c in delivered + rest) == TEXT
    # Per token, the rest is chunked exactly as the uninterrupted answer was.
    if settings.tokens_per_chunk == 1:
        assert [c.text for c in rest] == [c.text for c in whole[cut:]]
    last, first_run = rest[-1], whole[-1]
    assert (last.finish_reason, last.prompt_tokens) == (first_run.finish_reason, first_run.prompt_tokens)
    # Completion tokens count only what this node sent; the server adds the delivered ones.
    assert last.completion_tokens == first_run.completion_tokens - sum(len(c.text.split()) for c in delivered)


def test_max_tokens_still_counts_from_the_start_of_the_answer() -> None:
    whole = serve([request("r", max_tokens=5)]).chunks("r")
    assert whole[-1].finish_reason == "length"
    rest = numbered(serve([request("r~1", max_tokens=5, **Continuation.of(pieces_of(whole[:2])).to_metadata())]).chunks("r~1"), 2)
    assert "".join(c.text for c in whole[:2] + rest) == "".join(c.text for c in whole)
    assert (rest[-1].finish_reason, rest[-1].completion_tokens) == ("length", 3)


def test_everything_delivered_but_the_finish_gets_an_empty_finish() -> None:
    whole = serve([request("r", "a b")]).chunks("r")
    texts = [c.text for c in whole]
    [finish] = numbered(serve([request("r~1", "a b", **Continuation.of(texts).to_metadata())]).chunks("r~1"), 2)
    assert (finish.text, finish.finish_reason, finish.completion_tokens) == ("", "stop", 0)


def test_pieces_cut_inside_a_word_continue_with_the_rest_of_that_word() -> None:
    rest = numbered(serve([request("r~1", "hello world", **Continuation.of(["hel"]).to_metadata())]).chunks("r~1"), 1)
    assert [c.text for c in rest] == ["lo", " world"]


@pytest.mark.parametrize(
    "metadata, message",
    [
        pytest.param(Continuation.of(["the slow"]).to_metadata(), "not the start of this echo", id="another-answer"),
        pytest.param({"continue_from": 2, "continued_pieces": '["the"]'}, "holds 1 pieces", id="malformed"),
    ],
)
def test_what_cannot_be_continued_ends_with_an_error_and_never_starts_over(metadata: dict[str, Any], message: str) -> None:
    [chunk] = serve([request("r~1", **metadata)]).chunks("r~1")
    assert chunk.fin and chunk.finish_reason == "error" and message in (chunk.error or "")
    assert chunk.text == "" and not chunk.is_busy  # a real error, not a turn-away


@pytest.mark.parametrize("settings", [pytest.param(FAST, id="per-token"), pytest.param(STEP, id="step")])
def test_a_tool_call_answer_continues_after_the_delivered_argument_pieces(settings: Settings) -> None:
    tools = encode_tools([{"type": "function", "function": {"name": "get_weather", "parameters": {}}}])
    text = 'call get_weather {"city": "Paris", "unit": "C"}\ncall get_weather {"city": "Rome"}'
    whole = numbered(serve([request("r", text, **tools)], settings).chunks("r"), 0)
    cut = 5  # inside the first call
    rest = numbered(
        serve([request("r~1", text, **tools, **Continuation.of(pieces_of(whole[:cut])).to_metadata())], settings).chunks("r~1"),
        cut,
    )
    calls: dict[int, str] = {}
    for chunk in whole[:cut] + rest:
        if chunk.tool_call is not None:
            calls[chunk.tool_call.index] = calls.get(chunk.tool_call.index, "") + chunk.text
    assert [json.loads(arguments) for arguments in calls.values()] == [{"city": "Paris", "unit": "C"}, {"city": "Rome"}]
    assert rest[0].tool_call is not None and rest[0].tool_call.id is None  # the first call was already named
    assert rest[-1].finish_reason == "tool_calls"


# -- busy (ECHO_BUSY) ------------------------------------------------------------------------------


@pytest.mark.parametrize("settings", [pytest.param(FAST, id="per-token"), pytest.param(STEP, id="step")])
def test_busy_turns_every_request_away_with_nothing_generated(settings: Settings) -> None:
    busy = Settings(token_delay_s=0, step_ms=settings.step_ms, busy=True)
    node = serve([request("a"), request("b", **Continuation.of(["the"]).to_metadata())], busy)
    for request_id, seq in (("a", 0), ("b", 1)):
        [chunk] = node.chunks(request_id)
        assert chunk.is_busy and chunk.finish_reason == "error" and chunk.text == "" and chunk.seq == seq


# -- the exit directive (ECHO_EXIT_ON) ---------------------------------------------------------------


class Exits:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


@pytest.mark.parametrize("settings", [pytest.param(FAST, id="per-token"), pytest.param(STEP, id="step")])
def test_the_exit_directive_exits_before_sending_the_word_and_again_when_continued(settings: Settings) -> None:
    poisoned = Settings(token_delay_s=0, step_ms=settings.step_ms, exit_on="fox")
    exits = Exits()
    node = serve([request("r")], poisoned, on_exit=exits)
    assert exits.count == 1
    delivered = node.chunks("r")
    assert "".join(c.text for c in delivered) == "the quick  brown"  # everything before the word, then nothing
    assert not any(c.fin for c in delivered)
    # The replica that continues it reaches the word at once: it exits too, having sent nothing.
    again = Exits()
    continued = serve([request("r~1", **Continuation.of(pieces_of(delivered)).to_metadata())], poisoned, on_exit=again)
    assert again.count == 1 and continued.chunks("r~1") == []


def test_without_the_directive_the_word_is_just_echoed() -> None:
    exits = Exits()
    node = serve([request("r")], FAST, on_exit=exits)
    assert exits.count == 0 and "".join(c.text for c in node.chunks("r")) == TEXT


def test_the_directive_and_busy_are_read_from_the_environment_only_when_set() -> None:
    assert (Settings.from_env({}).busy, Settings.from_env({}).exit_on) == (False, None)
    settings = Settings.from_env({"ECHO_BUSY": "1", "ECHO_EXIT_ON": "poison pill", "ECHO_HEARTBEAT_S": "0.5"})
    assert (settings.busy, settings.exit_on, settings.heartbeat_s) == (True, "poison pill", 0.5)
    with pytest.raises(ValueError, match="ECHO_HEARTBEAT_S"):
        Settings.from_env({"ECHO_HEARTBEAT_S": "-1"})


# -- heartbeats ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings", [pytest.param(Settings(token_delay_s=0.005), id="per-token"), pytest.param(Settings(step_ms=5), id="step")]
)
def test_heartbeats_flow_while_requests_are_held_and_one_says_when_idle(settings: Settings) -> None:
    node = RecordingNode()
    heartbeat = Heartbeat(node, "echo-1", interval_s=0.02, can_continue=True)
    engine(settings, node, heartbeat=heartbeat).run([request("a"), request("b", "one two three")])
    beats = [s for s in node.statuses() if s.kind == "heartbeat"]
    # 16 tokens at 5 ms: the answer takes 80 ms or more, a heartbeat is due every 20 ms.
    assert len(beats) >= 3
    assert beats[0].active == 2 and beats[-1].active == 0 and all(b.can_continue for b in beats)
    sent = node.sent
    first_chunk = next(i for i, s in enumerate(sent) if not s.is_status)
    last_chunk = max(i for i, s in enumerate(sent) if not s.is_status)
    assert any(s.is_status for s in sent[first_chunk:last_chunk]), "no heartbeat while the answers streamed"
    assert sent[-1].is_status and beats[-1].active == 0  # the idle beat comes after the last chunk


def test_an_idle_node_sends_no_heartbeat() -> None:
    node = RecordingNode()
    EchoStream(node, FAST, heartbeat=Heartbeat(node, "echo-1", interval_s=0.001)).run([])
    assert node.sent == []
