"""echo-stream shared by several server processes: each answer on its server's output, a server gone stops its requests.

docs/architecture.md, "Several server processes": the server names itself in each request
(``server``), the node answers on ``chunks/<server>``, and a server that dora restarted (or whose
request input closed) has nobody left to read its answers.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from echo_stream.engine import EchoStream
from echo_stream.settings import Settings
from echo_stream.step import StepEcho

from openai_stream_protocol import SERVER_KEY, USER_TEXT_PREFIX
from openai_stream_protocol.testing import RecordingNode

TEXT = "one two three four"


def request(request_id: str, server: str) -> dict[str, Any]:
    metadata = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, SERVER_KEY: server}
    value = pa.array([USER_TEXT_PREFIX + TEXT], type=pa.string())
    return {"type": "INPUT", "id": f"v1/chat/completions/{server}", "value": value, "metadata": metadata}


@pytest.mark.parametrize("settings", [Settings(token_delay_s=0), Settings(token_delay_s=0, step_ms=1)], ids=["chunks", "step"])
def test_each_answer_goes_to_its_servers_output(settings: Settings) -> None:
    node = RecordingNode()
    echo = StepEcho(node, settings) if settings.step_ms else EchoStream(node, settings)
    echo.run([request("a", "srv-1"), request("b", "srv-2")])
    assert {m.output_id for m in node.sent} == {"chunks/srv-1", "chunks/srv-2"}
    assert node.text("a", "chunks/srv-1") == TEXT and node.text("b", "chunks/srv-2") == TEXT
    assert {c.request_id for c in node.chunks(output_id="chunks/srv-1")} == {"a"}
    assert {c.request_id for c in node.chunks(output_id="chunks/srv-2")} == {"b"}


@pytest.mark.parametrize("gone", ["NODE_RESTARTED", "INPUT_CLOSED"])
@pytest.mark.parametrize("settings", [Settings(token_delay_s=0), Settings(token_delay_s=0, step_ms=1)], ids=["chunks", "step"])
def test_a_server_gone_stops_its_requests_and_no_others(settings: Settings, gone: str) -> None:
    node = RecordingNode()
    echo = StepEcho(node, settings) if settings.step_ms else EchoStream(node, settings)
    event_id = "srv-1" if gone == "NODE_RESTARTED" else "v1/chat/completions/srv-1"
    echo.run([request("a", "srv-1"), request("b", "srv-2"), request("c", "srv-1"), {"type": gone, "id": event_id}])
    assert node.messages("chunks/srv-1") == []  # stopped before its first chunk
    assert node.text("b", "chunks/srv-2") == TEXT and node.chunks("b")[-1].fin
    assert not echo.active and not echo.waiting


def test_a_restarted_node_that_asked_nothing_changes_nothing() -> None:
    node = RecordingNode()
    echo = EchoStream(node, Settings(token_delay_s=0))
    echo.run([request("a", "srv-1"), {"type": "NODE_RESTARTED", "id": "echo-stream-2"}])
    assert node.text("a", "chunks/srv-1") == TEXT
