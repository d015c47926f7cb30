"""Hello and heartbeat: what a node says about itself on its chunk output, and the ``Heartbeat`` pacing."""

from __future__ import annotations

from typing import Any

import pytest

from openai_stream_protocol import (
    ACTIVE_KEY,
    HEARTBEAT_KEY,
    Heartbeat,
    NodeStatus,
    is_status,
    node_id_from_env,
    parse_chunk,
    parse_status,
    send_heartbeat,
    send_hello,
)
from openai_stream_protocol.testing import RecordingNode


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_hello_states_what_the_node_can_do_and_an_old_hello_still_reads() -> None:
    node = RecordingNode()
    send_hello(node, "echo-2", can_continue=True, heartbeat_s=0.25)
    send_hello(node, "legacy")
    [sent, old] = node.sent
    assert sent.output_id == "chunks" and sent.data.to_pylist() == [] and sent.is_hello
    assert sent.metadata == {"hello": "echo-2", "can_continue": True, "heartbeat_s": 0.25}
    assert old.metadata == {"hello": "legacy"}  # the form every server so far understands
    assert node.statuses() == [NodeStatus("hello", "echo-2", True, 0.25), NodeStatus("hello", "legacy")]
    assert node.chunks() == []


def test_a_heartbeat_carries_the_load_and_is_never_a_chunk() -> None:
    node = RecordingNode()
    send_heartbeat(node, "echo-1", active=3, queued=2, can_continue=True)
    [sent] = node.sent
    assert sent.metadata == {"heartbeat": "echo-1", "active": 3, "queued": 2, "can_continue": True}
    assert sent.is_status and not sent.is_hello and is_status(sent.metadata)
    assert parse_status(sent.metadata) == NodeStatus("heartbeat", "echo-1", True, None, 3, 2)
    assert node.chunks() == [] and node.texts() == [] and node.request_ids() == []


@pytest.mark.parametrize(
    "metadata, expected",
    [
        pytest.param({"request_id": "r", "seq": 0}, None, id="a-chunk"),
        pytest.param(
            {HEARTBEAT_KEY: "n", ACTIVE_KEY: "x", "queued": -1, "can_continue": "true"},
            NodeStatus("heartbeat", "n", True, None, None, None),
            id="odd-values-read-as-not-given",
        ),
        pytest.param({"hello": "n", "heartbeat_s": "nan"}, NodeStatus("hello", "n"), id="nan-interval"),
        pytest.param({"hello": "n", "heartbeat_s": "0.5"}, NodeStatus("hello", "n", False, 0.5), id="interval-as-string"),
    ],
)
def test_parse_status_is_lenient(metadata: dict[str, Any], expected: NodeStatus | None) -> None:
    assert parse_status(metadata) == expected


def test_heartbeat_sends_at_once_on_work_then_every_interval_then_once_when_idle() -> None:
    node, clock = RecordingNode(), Clock()
    heartbeat = Heartbeat(node, "m", interval_s=0.25, can_continue=True, clock=clock)
    heartbeat.hello()
    assert heartbeat.beat(0) is None and heartbeat.sent == 0  # idle: nothing, no wake-up needed
    assert heartbeat.beat(1, 2) == pytest.approx(0.25) and heartbeat.sent == 1
    clock.now += 0.1
    assert heartbeat.beat(1, 2) == pytest.approx(0.15) and heartbeat.sent == 1  # not due yet
    clock.now += 0.15
    assert heartbeat.beat(2, 0) == pytest.approx(0.25) and heartbeat.sent == 2
    clock.now += 0.01
    assert heartbeat.beat(0, 0) is None and heartbeat.sent == 3  # became idle: one beat saying so
    clock.now += 5
    assert heartbeat.beat(0, 0) is None and heartbeat.sent == 3
    loads = [(s.kind, s.active, s.queued) for s in node.statuses()]
    assert loads == [("hello", None, None), ("heartbeat", 1, 2), ("heartbeat", 2, 0), ("heartbeat", 0, 0)]
    assert node.statuses()[0] == NodeStatus("hello", "m", True, 0.25)


def test_an_interval_of_zero_turns_heartbeats_off_and_the_hello_promises_none() -> None:
    node = RecordingNode()
    heartbeat = Heartbeat(node, "m", interval_s=0)
    heartbeat.hello()
    assert heartbeat.beat(5, 5) is None
    assert node.statuses() == [NodeStatus("hello", "m")]
    with pytest.raises(ValueError, match="interval"):
        Heartbeat(node, "m", interval_s=-1)


def test_an_old_server_reading_a_status_message_as_a_chunk_gets_no_text() -> None:
    # Not a guarantee the protocol makes, but what keeps a mixed deployment from inventing answer text.
    node = RecordingNode()
    send_heartbeat(node, "m", active=1)
    assert parse_chunk(node.sent[0].data.to_pylist(), {}).text == ""


@pytest.mark.parametrize(
    "config, expected",
    [
        pytest.param("node_id: echo-2\nother: x\n", "echo-2", id="dora-config"),
        pytest.param("name: x\n", "fallback", id="no-line"),
        pytest.param(None, "fallback", id="outside-dora"),
    ],
)
def test_node_id_from_env(config: str | None, expected: str) -> None:
    environ = {} if config is None else {"DORA_NODE_CONFIG": config}
    assert node_id_from_env(environ, "fallback") == expected
