"""Resend in qwenvl-stream: decode-step rows lost on the way come back on the server's ask (fake engine, no torch)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest
from qwenvl_helpers import Waits, request
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings
from test_qwenvl_scheduler import USER, FakeEngine

from openai_stream_protocol import ResendAsk, ResendingOutput, parse_resend_missed, send_resend_ask
from openai_stream_protocol.testing import RecordingNode

pytestmark = pytest.mark.timeout(60)


class LoseRows:
    """Loses the step messages named by number (0, 1, ...), as a congested transport would; resends pass."""

    def __init__(self, node: RecordingNode, lose: set[int]) -> None:
        self.node, self.lose, self.steps = node, lose, 0

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        if isinstance(data, pa.StructArray) and not (metadata or {}).get("resent"):
            self.steps += 1
            if self.steps - 1 in self.lose:
                return
        self.node.send_output(output_id, data, metadata)


def ask(request_id: str, first: int, end: int | None = None) -> dict[str, Any]:
    recorder = RecordingNode()
    send_resend_ask(recorder, "resend/qwenvl-stream-1", ResendAsk(request_id, first, end))
    [sent] = recorder.sent
    return {"type": "INPUT", "id": "resend", "value": sent.data, "metadata": sent.metadata}


def test_lost_steps_come_back_and_an_unknown_request_is_answered_missed() -> None:
    pieces = [f"p{i} " for i in range(6)]
    inner = RecordingNode()
    out = ResendingOutput(LoseRows(inner, {1, 4}))
    waits = Waits()

    def finished() -> bool:
        return any(c.fin for c in inner.chunks("r")) or bool(out._kept.get("r") and out._kept["r"].finished_at)

    def events() -> Iterator[dict[str, Any]]:
        yield request("r", [USER + "hi"], max_tokens=64)
        waits(finished, "the answer to end")
        yield ask("r", 1, 2)  # the hole before what arrived
        yield ask("r", 4)  # the lost last step: everything from seq 4 on
        yield ask("gone", 0)

    Scheduler(out, FakeEngine(pieces), Settings(max_batch=1)).run(events())
    assert waits.missed == []
    got = {c.seq: c for c in inner.chunks("r")}
    assert sorted(got) == list(range(len(pieces) + 1)) and got[len(pieces)].fin
    assert "".join(got[s].text for s in sorted(got)) == "".join(pieces)
    missed = [parse_resend_missed(m) for m in inner.metadata() if "resend_missed" in m]
    assert missed == [("gone", 0)]
