"""Resend asks through the app and the bridge, on a scripted dora node (docs/architecture.md, "Resend").

A hole in a stream's ``seq`` is asked for again from the replica that holds the request, a bounded
number of times, before the gap timeout; a lost last chunk is asked for after the stream went quiet;
a replica that no longer holds the range ends the stream at once; one that never said
``can_resend`` is never asked and keeps the gap timeout. ``/health`` reports the loss and a replica
that keeps restarting.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from openai_stream_protocol import RESEND_MISSED_KEY, read_resend_ask
from openai_stream_server import resend as resend_module
from openai_stream_server.state import Status
from tests.live import metric
from tests.unit.test_bridge import chunk_event
from tests.unit.test_failover import app_over, introduce, until
from tests.unit.test_replicas import ReplicaNode, background, replica_config

pytestmark = pytest.mark.timeout(30)


@pytest.fixture(autouse=True)
def quick_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Asks a few sweeps apart instead of a second: the order of things is what is tested, not the pace."""
    monkeypatch.setattr(resend_module, "RESEND_AFTER_S", 0.02)
    monkeypatch.setattr(resend_module, "RESEND_INTERVAL_S", 0.15)
    monkeypatch.setattr(resend_module, "TAIL_IDLE_S", 0.3)


def resend_config(ids: tuple[str, ...] = ("a", "b"), resend: tuple[str, ...] = ("a", "b")) -> dict[str, Any]:
    config = replica_config(ids)
    config["outputs"] += [f"resend/{r}" for r in resend]
    return config


def asks(node: ReplicaNode) -> list[tuple[str, tuple[str, int, int | None]]]:
    found = []
    for output, data, metadata in node.sent:
        if output.startswith("resend"):
            ask = read_resend_ask(data, metadata)
            assert ask is not None
            found.append((output, (ask.request_id, ask.first, ask.end)))
    return found


def on(replica: str, wire_id: str, seq: int, text: str, **metadata: Any) -> dict[str, Any]:
    return chunk_event(wire_id, seq, text, input_id=f"chunks/{replica}", **metadata)


async def test_a_hole_is_asked_for_again_and_the_stream_completes_whole() -> None:
    node = ReplicaNode(resend_config())
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", can_resend=True)
        rid = (await background(client, "one two three")).json()["id"]
        node.push(on("a", rid, 0, "one"), on("a", rid, 2, " three"))  # seq 1 lost on the way
        assert await until(lambda: asks(node) != [])
        assert asks(node)[0] == ("resend/a", (rid, 1, 2))
        node.push(on("a", rid, 1, " two", resent=True), on("a", rid, 3, "", fin=True, finish_reason="stop"))
        state = registry.get(rid)
        assert await until(lambda: state.done)
        assert state.status is Status.COMPLETED and state.log.text == "one two three"
        assert await until(lambda: app_resender(client).served == 1)
        metrics = (await client.get("/metrics")).text
        health = (await client.get("/health")).json()
    assert metric(metrics, "oss_resends_requested_total") == len(asks(node)) >= 1
    assert metric(metrics, "oss_resends_served_total") == 1 and metric(metrics, "oss_resends_failed_total") == 0
    assert health["chunk_loss"]["gaps_last_minute"] == 1 and health["chunk_loss"]["by_replica"] == {"a": 1}
    assert health["status"] == "degraded" and "publish channel" in health["chunk_loss"]["likely_cause"]


def app_resender(client: Any) -> Any:
    return client._transport.app.state.resender  # the app the test client talks to


async def test_a_lost_last_chunk_is_asked_for_after_the_stream_goes_quiet() -> None:
    node = ReplicaNode(resend_config())
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", can_resend=True)
        rid = (await background(client, "one two")).json()["id"]
        node.push(on("a", rid, 0, "one"), on("a", rid, 1, " two"))  # the fin (seq 2) never comes
        assert await until(lambda: asks(node) != [])
        assert asks(node)[0] == ("resend/a", (rid, 2, None))  # everything from seq 2 on
        node.push(on("a", rid, 2, "", fin=True, finish_reason="stop", resent=True))
        state = registry.get(rid)
        assert await until(lambda: state.done)
        assert state.status is Status.COMPLETED and state.log.text == "one two"


async def test_asks_are_bounded_and_the_gap_timeout_still_ends_the_stream() -> None:
    node = ReplicaNode(resend_config())
    async with app_over(node, gap_timeout_s=1.0) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", can_resend=True)
        rid = (await background(client, "one two three")).json()["id"]
        node.push(on("a", rid, 0, "one"), on("a", rid, 2, " three"))
        state = registry.get(rid)
        assert await until(lambda: state.done)
        assert state.status is Status.FAILED and state.error.code == "missing_chunk"
        assert 1 <= len(asks(node)) <= resend_module.MAX_RESEND_ASKS
        assert await until(lambda: app_resender(client).failed == 1)
        health = (await client.get("/health")).json()
    assert health["chunk_loss"]["resends_failed_last_minute"] == 1


async def test_a_replica_that_no_longer_holds_the_range_ends_the_stream_at_once() -> None:
    node = ReplicaNode(resend_config())
    async with app_over(node, gap_timeout_s=20.0) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", can_resend=True)
        rid = (await background(client, "one two three")).json()["id"]
        node.push(on("a", rid, 0, "one"), on("a", rid, 2, " three"))
        assert await until(lambda: asks(node) != [])
        missed = {RESEND_MISSED_KEY: rid, "resend_from": 1}
        node.push({"type": "INPUT", "id": "chunks/a", "value": pa.array([], type=pa.string()), "metadata": missed})
        state = registry.get(rid)
        assert await until(lambda: state.done, timeout_s=3)  # not the 20 s gap timeout
        assert state.status is Status.FAILED and state.error.code == "missing_chunk"
        assert "seq 1" in state.error.message and "'a'" in state.error.message
        assert app_resender(client).failed == 1 and bridge.malformed_chunks == 0


@pytest.mark.parametrize(
    "config, hello",
    [
        pytest.param(resend_config(), {}, id="never-said-can-resend"),
        pytest.param(replica_config(("a", "b")), {"can_resend": True}, id="no-resend-output"),
    ],
)
async def test_a_replica_without_resend_is_never_asked_and_keeps_the_gap_timeout(
    config: dict[str, Any], hello: dict[str, Any]
) -> None:
    node = ReplicaNode(config)
    async with app_over(node, gap_timeout_s=0.5) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", **hello)
        rid = (await background(client, "one two three")).json()["id"]
        node.push(on("a", rid, 0, "one"), on("a", rid, 2, " three"))
        state = registry.get(rid)
        assert await until(lambda: state.done)
        assert state.status is Status.FAILED and state.error.code == "missing_chunk"
        assert state.log.text == "one"  # everything before the hole was delivered
        assert asks(node) == [] and state.timed_out == "gap"


async def test_health_names_a_replica_that_keeps_restarting() -> None:
    node = ReplicaNode(resend_config())
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b")
        for _ in range(3):
            node.push({"type": "NODE_RESTARTED", "id": "b"})
            node.push(on_hello("b"))
        assert await until(lambda: bridge.restart_log.last_minute("b") == 3)
        health = (await client.get("/health")).json()
    rows = {r["id"]: r for r in health["replicas"]}
    assert rows["b"]["restarts_last_minute"] == 3 and rows["a"]["restarts_last_minute"] == 0
    assert health["restarting"] == ["b"]


def on_hello(replica: str) -> dict[str, Any]:
    return {"type": "INPUT", "id": f"chunks/{replica}", "value": pa.array([], type=pa.string()), "metadata": {"hello": replica}}


async def test_a_silent_replica_that_never_got_its_requests_is_probed_and_comes_back_on_its_answer() -> None:
    """Requests lost on the way leave a replica idle: no heartbeats, judged silent; the probe's answer revives it."""
    node = ReplicaNode(resend_config())
    async with app_over(node, silence_s=0.4) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", can_resend=True)
        await background(client, "never arrives")  # to a, which never hears of it (nor b after it: a poison request)
        a = bridge.replicas.by_id["a"]
        assert await until(lambda: not a.live)
        assert await until(lambda: any(req[0] == "resend-probe" for out, req in asks(node) if out == "resend/a"))
        missed = {RESEND_MISSED_KEY: "resend-probe", "resend_from": 0}
        node.push({"type": "INPUT", "id": "chunks/a", "value": pa.array([], type=pa.string()), "metadata": missed})
        assert await until(lambda: a.live)
        assert app_resender(client).failed == 0  # the probe's answer ends no stream
