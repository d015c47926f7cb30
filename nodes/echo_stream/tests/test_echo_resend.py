"""Resend in echo-stream: the test-only drop injector, and lost chunks sent again on the server's ask, both modes."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from echo_stream.drop import DropEvery
from echo_stream.engine import EchoStream
from echo_stream.settings import Settings
from echo_stream.step import StepEcho

from openai_stream_protocol import (
    USER_TEXT_PREFIX,
    ResendAsk,
    ResendingOutput,
    is_resend_missed,
    parse_resend_missed,
    send_resend_ask,
)
from openai_stream_protocol.testing import RecordingNode


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def request(request_id: str, text: str) -> dict[str, Any]:
    meta = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, "max_tokens": 0}
    return {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array([USER_TEXT_PREFIX + text]), "metadata": meta}


def ask(request_id: str, first: int, end: int | None = None) -> dict[str, Any]:
    recorder = RecordingNode()
    send_resend_ask(recorder, "resend/echo", ResendAsk(request_id, first, end))
    [sent] = recorder.sent
    return {"type": "INPUT", "id": "resend", "value": sent.data, "metadata": sent.metadata}


def cancel(request_id: str) -> dict[str, Any]:
    return {"type": "INPUT", "id": "cancel", "value": pa.array([request_id]), "metadata": {"request_id": request_id}}


def run_until_idle(echo: EchoStream, clock: Clock, limit: int = 200) -> None:
    for _ in range(limit):
        due = echo.step(clock.now)
        if due is None:
            return
        clock.now = due
    raise AssertionError("still active after the step limit")


def test_settings_read_the_drop_injector_off_by_default() -> None:
    assert Settings.from_env({}).drop_every == 0
    assert Settings.from_env({"ECHO_DROP_EVERY": "7"}).drop_every == 7
    with pytest.raises(ValueError, match="ECHO_DROP_EVERY"):
        Settings.from_env({"ECHO_DROP_EVERY": "1"})


def test_the_injector_drops_every_nth_chunk_message_and_never_a_status_or_a_resend() -> None:
    inner = RecordingNode()
    drop = DropEvery(inner, 3)
    for seq in range(6):
        drop.send_output("chunks", pa.array(["x"]), {"request_id": "r", "seq": seq})
    drop.send_output("chunks", pa.array([], type=pa.string()), {"hello": "n"})
    drop.send_output("chunks", pa.array(["x"]), {"request_id": "r", "seq": 2, "resent": True})
    assert [m.get("seq") for m in inner.metadata()] == [0, 1, 3, 4, None, 2]
    assert drop.dropped == 2 and drop.counted == 6


@pytest.mark.parametrize("mode", [Settings(token_delay_s=0), Settings(token_delay_s=0, step_ms=10)], ids=["per-token", "step"])
def test_lost_chunks_come_back_on_the_ask_word_for_word(mode: Settings) -> None:
    """Every 4th message lost; the asks for the holes (and for the lost end) give back the whole echo."""
    clock, inner = Clock(), RecordingNode()
    out = ResendingOutput(DropEvery(inner, 4), clock=clock)
    echo = (StepEcho if mode.step_ms else EchoStream)(out, mode, clock=clock)
    words = " ".join(f"w{i}" for i in range(12))
    echo.handle(request("a", words))
    echo.handle(request("b", words))
    run_until_idle(echo, clock)
    for rid in ("a", "b"):
        got = {c.seq: c for c in inner.chunks(rid)}
        last = max(got)
        holes = [seq for seq in range(last + 1) if seq not in got]
        if holes or not got[last].fin:  # open-ended: everything from the first hole (or the lost end) on
            echo.handle(ask(rid, holes[0] if holes else last + 1))
        got.update({c.seq: c for c in inner.chunks(rid)})
        seqs = sorted(got)
        assert seqs == list(range(len(seqs))) and got[seqs[-1]].fin
        assert "".join(got[s].text for s in seqs) == words
    assert out.resent > 0 and out.missed == 0


def test_an_ask_for_a_cancelled_request_is_answered_missed_and_a_generating_one_is_not() -> None:
    clock, inner = Clock(), RecordingNode()
    echo = EchoStream(ResendingOutput(inner, clock=clock), Settings(token_delay_s=1), clock=clock)
    echo.handle(request("slow", "one two three"))
    echo.handle(ask("slow", 0))  # nothing sent yet: it is generating, not lost
    assert inner.sent == []
    echo.handle(cancel("slow"))
    echo.handle(ask("slow", 0))
    [missed] = inner.sent
    assert is_resend_missed(missed.metadata) and parse_resend_missed(missed.metadata) == ("slow", 0)


def test_without_a_resend_memory_an_ask_is_ignored() -> None:
    clock, inner = Clock(), RecordingNode()
    echo = EchoStream(inner, Settings(token_delay_s=0), clock=clock)
    echo.handle(request("a", "x y"))
    run_until_idle(echo, clock)
    before = len(inner.sent)
    echo.handle(ask("a", 0))
    assert len(inner.sent) == before
