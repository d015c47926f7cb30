"""Several server processes sharing replicas: answers on the asking server's output, status to every server, server gone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import (
    LOAD_CHANGE_S,
    SERVER_KEY,
    BatchSender,
    ChunkSender,
    Heartbeat,
    answer_outputs,
    dispatch_event,
    parse_batch,
    reply_output,
    request_server,
    server_of_input,
)
from openai_stream_protocol.testing import RecordingNode


class ConfiguredNode(RecordingNode):
    """A recorder that declares outputs, as ``dora.Node.node_config()`` does."""

    def __init__(self, outputs: list[str]) -> None:
        super().__init__()
        self.outputs = outputs

    def node_config(self) -> dict[str, Any]:
        return {"inputs": {}, "outputs": self.outputs}


class Handler:
    def __init__(self) -> None:
        self.requests: list[tuple[list[str], dict[str, Any]]] = []
        self.cancels: list[str] = []
        self.gone: list[str] = []

    def on_request(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        self.requests.append((texts, dict(metadata)))

    def on_cancel(self, request_id: str) -> None:
        self.cancels.append(request_id)

    def on_stop(self) -> None:
        pass

    def on_server_gone(self, server: str) -> None:
        self.gone.append(server)


def test_a_request_without_a_server_is_answered_on_the_plain_output_as_before() -> None:
    node = RecordingNode()
    sender = ChunkSender(node, {"request_id": "r1"})
    sender.send("hi")
    sender.finish()
    assert [m.output_id for m in node.sent] == ["chunks", "chunks"]
    assert SERVER_KEY not in node.sent[0].metadata and sender.server is None
    assert reply_output({"request_id": "r1"}) == "chunks" and request_server({}) is None


def test_a_request_that_names_its_server_is_answered_on_that_servers_output_only() -> None:
    node = RecordingNode()
    one = ChunkSender(node, {"request_id": "r1", SERVER_KEY: "srv-1"})
    two = ChunkSender(node, {"request_id": "r2", SERVER_KEY: "srv-2"}, output="text")
    one.send("a")
    two.send("b")
    one.finish()
    assert [(m.output_id, m.metadata["request_id"]) for m in node.sent] == [
        ("chunks/srv-1", "r1"),
        ("text/srv-2", "r2"),
        ("chunks/srv-1", "r1"),
    ]
    assert SERVER_KEY not in node.sent[0].metadata  # the output says it: nothing more on the wire
    assert (one.server, two.server) == ("srv-1", "srv-2")


def test_a_batch_step_is_one_message_per_server_with_rows() -> None:
    node = RecordingNode()
    batch = BatchSender(node)
    for rid, server in (("a", "srv-1"), ("b", "srv-2"), ("c", "srv-1"), ("d", None)):
        batch.open({"request_id": rid, **({SERVER_KEY: server} if server else {})})
    batch.send("a", "a0")
    batch.send_reasoning("b", "b0")
    batch.send_tool_call("c", 0, "{", call_id="call_1", name="f")
    batch.send("d", "d0")
    assert batch.queued == 4 and "a" in batch and "d" in batch
    assert batch.emit() == 4
    by_output = {m.output_id: parse_batch(m.data) for m in node.sent}
    assert sorted(by_output) == ["chunks", "chunks/srv-1", "chunks/srv-2"]
    assert [(c.request_id, c.seq, c.text) for c in by_output["chunks/srv-1"]] == [("a", 0, "a0"), ("c", 0, "{")]
    assert by_output["chunks/srv-1"][1].tool_call is not None and by_output["chunks/srv-1"][1].tool_call.name == "f"
    assert by_output["chunks/srv-2"][0].reasoning and by_output["chunks"][0].request_id == "d"
    node.clear()
    batch.finish("a", completion_tokens=1)
    batch.busy("b")
    batch.discard("c")
    assert "a" not in batch and "c" not in batch
    assert batch.emit() == 2 and batch.emit() == 0
    rows = {m.output_id: parse_batch(m.data) for m in node.sent}
    assert sorted(rows) == ["chunks/srv-1", "chunks/srv-2"]  # nothing for a server without rows
    assert [(c.request_id, c.seq, c.fin) for c in rows["chunks/srv-1"]] == [("a", 1, True)]
    assert rows["chunks/srv-2"][0].is_busy
    with pytest.raises(KeyError):
        batch.send("a", "after the finish")


def test_the_hello_and_heartbeats_go_to_every_server_output() -> None:
    node = ConfiguredNode(["chunks/srv-1", "chunks/srv-2", "other"])
    clock = iter([0.0, 0.1, 0.3]).__next__
    heartbeat = Heartbeat(node, "echo-1", clock=clock)
    assert heartbeat.outputs == ["chunks/srv-1", "chunks/srv-2"] == answer_outputs(node)
    heartbeat.hello()
    heartbeat.beat(2, 1)
    assert [(m.output_id, m.is_hello) for m in node.sent] == [
        ("chunks/srv-1", True),
        ("chunks/srv-2", True),
        ("chunks/srv-1", False),
        ("chunks/srv-2", False),
    ]
    assert node.sent[3].metadata["active"] == 2 and node.sent[3].metadata["queued"] == 1


@pytest.mark.parametrize(
    "node, outputs",
    [
        pytest.param(RecordingNode(), ["chunks"], id="no-node-config"),
        pytest.param(ConfiguredNode(["chunks"]), ["chunks"], id="one-server"),
        pytest.param(ConfiguredNode(["text"]), ["chunks"], id="none-declared"),
        pytest.param(ConfiguredNode(["chunks", "chunks/s"]), ["chunks", "chunks/s"], id="both"),
    ],
)
def test_answer_outputs(node: RecordingNode, outputs: list[str]) -> None:
    assert answer_outputs(node) == outputs


def test_a_wrapped_node_still_tells_its_outputs() -> None:
    class Wrapper:
        def __init__(self, node: Any) -> None:
            self.node = node

    assert answer_outputs(Wrapper(ConfiguredNode(["chunks/a", "chunks/b"]))) == ["chunks/a", "chunks/b"]


def test_dispatch_takes_per_server_inputs_and_tells_of_a_server_gone() -> None:
    handler = Handler()
    value = pa.array(["<|user|>\n<|im_start|>\nhi"], type=pa.string())
    events: list[dict[str, Any]] = [
        {"type": "INPUT", "id": "v1/chat/completions/srv-1", "value": value, "metadata": {"request_id": "r1"}},
        {"type": "INPUT", "id": "cancel/srv-2", "value": pa.array(["r2"]), "metadata": {"request_id": "r2"}},
        {"type": "NODE_RESTARTED", "id": "srv-1"},
        {"type": "INPUT_CLOSED", "id": "v1/chat/completions/srv-2"},
        {"type": "INPUT_CLOSED", "id": "tick"},
        {"type": "INPUT", "id": "v1/chat/completionsX", "value": value, "metadata": {}},
    ]
    for event in events:
        assert dispatch_event(event, handler)
    assert [m["request_id"] for _, m in handler.requests] == ["r1"]
    assert handler.cancels == ["r2"] and handler.gone == ["srv-1", "srv-2"]
    assert dispatch_event({"type": "NODE_RESTARTED", "id": "srv-1"}, object())  # type: ignore[arg-type]  # no hook: ignored


@pytest.mark.parametrize(
    "input_id, server",
    [
        ("v1/chat/completions/openai-stream-server-2", "openai-stream-server-2"),
        ("cancel/s", "s"),
        ("v1/chat/completions", None),
        ("cancel/", None),
        ("chunks/s", None),
    ],
)
def test_server_of_input(input_id: str, server: str | None) -> None:
    assert server_of_input(input_id) == server


def test_a_change_of_load_is_told_at_once_but_at_most_every_load_change_s() -> None:
    """Every server routes on the heartbeats' load (docs/architecture.md, "Several server processes"): a report that
    waits for the next interval would count requests that ended up to 0.25 s ago."""
    node, now = RecordingNode(), [0.0]
    heartbeat = Heartbeat(node, "echo-1", interval_s=0.25, clock=lambda: now[0])
    assert heartbeat.beat(1) == pytest.approx(0.25)  # took on work: told at once
    now[0] = 0.005
    assert heartbeat.beat(2) == pytest.approx(LOAD_CHANGE_S - 0.005)  # changed too soon: wake when it may be told
    now[0] = LOAD_CHANGE_S
    assert heartbeat.beat(2) == pytest.approx(0.25)  # told
    now[0] = 0.1
    assert heartbeat.beat(2) == pytest.approx(LOAD_CHANGE_S + 0.25 - 0.1)  # unchanged: the next is the interval's
    now[0] = 0.2
    heartbeat.beat(1, 3)
    loads = [(s.active, s.queued) for s in node.statuses()]
    assert loads == [(1, 0), (2, 0), (1, 3)]
