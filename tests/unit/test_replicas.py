"""Replicas: declaration, routing, failover and recovery (docs/architecture.md, "Replicas and failover").

``ReplicaSet`` alone for the routing rules; then the app over a real ``DoraBridge`` and the scripted
``FakeNode`` of ``test_bridge.py`` for what travels: which output a request and a cancel go out on,
what happens to requests in flight when a replica's input closes or dora restarts its node, and how a
replica comes back. Requests are background ones, so each POST answers at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pyarrow as pa
import pytest
import yaml

from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.app import create_app
from openai_stream_server.bridge import DoraBridge
from openai_stream_server.replicas import DEFAULT_REPLICA, LegacyReplicas, Replica, ReplicaSet, discover
from openai_stream_server.settings import Settings
from openai_stream_server.state import Status
from tests.dataflow import ROOT
from tests.live import metric
from tests.unit.test_bridge import STOP, FakeNode, chunk_event, reader_of

pytestmark = pytest.mark.timeout(30)

IDS = ("a", "b", "c")


def replica_config(ids: tuple[str, ...] = IDS) -> dict[str, Any]:
    """A server node's ``node_config()`` with one request/cancel output pair and one answer input per replica."""
    inputs: dict[str, Any] = {f"chunks/{r}": {"source": f"{r}/chunks"} for r in ids}
    inputs["tick"] = "dora/timer/millis/500"
    outputs = [o for r in ids for o in (f"v1/chat/completions/{r}", f"cancel/{r}")]
    return {"inputs": inputs, "outputs": outputs}


class ReplicaNode(FakeNode):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(inputs=config["inputs"])
        self.config = config

    def node_config(self) -> dict[str, Any]:
        return self.config

    def requests(self) -> list[tuple[str, str]]:
        """(output, wire request id) of every request sent, in order."""
        return [(out, md["request_id"]) for out, _, md in self.sent if out.startswith("v1/chat/completions")]

    def cancels(self) -> list[tuple[str, str]]:
        return [(out, md["request_id"]) for out, _, md in self.sent if out.startswith("cancel")]


def closed(input_id: str) -> dict[str, Any]:
    return {"type": "INPUT_CLOSED", "id": input_id}


def hello(replica: str) -> dict[str, Any]:
    return {"type": "INPUT", "id": f"chunks/{replica}", "value": pa.array([], type=pa.string()), "metadata": {"hello": replica}}


def unnamed(replica: str, texts: list[str]) -> dict[str, Any]:
    """A reply with neither ``request_id`` nor ``seq``: what a legacy node that passes no metadata back sends."""
    return {"type": "INPUT", "id": f"chunks/{replica}", "value": pa.array(texts, type=pa.string()), "metadata": {}}


def answer(wire_id: str, replica: str, words: list[str]) -> list[dict[str, Any]]:
    events = [chunk_event(wire_id, i, w, input_id=f"chunks/{replica}") for i, w in enumerate(words)]
    events.append(chunk_event(wire_id, len(words), "", input_id=f"chunks/{replica}", fin=True, finish_reason="stop"))
    return events


# -- declaration ---------------------------------------------------------------------


def server_config(path: str) -> dict[str, Any]:
    spec = yaml.safe_load((ROOT / path).read_text())
    node = next(n for n in spec["nodes"] if n["id"] == "openai-stream-server")
    return {"inputs": node["inputs"], "outputs": node["outputs"]}


def test_the_single_model_layout_is_one_replica_named_after_its_node() -> None:
    [replica] = discover(server_config("dataflow-stream.yml"))
    assert (replica.replica_id, replica.request_output, replica.cancel_output) == ("echo-stream", "v1/chat/completions", "cancel")
    assert replica.inputs == {"v1/chat/completions"} and replica.nodes == {"echo-stream"}


def test_the_shipped_replica_dataflow_declares_three_replicas_each_with_its_outputs_and_input() -> None:
    replicas = discover(server_config("dataflow-replicas.yml"))
    assert [(r.replica_id, r.request_output, r.cancel_output, set(r.inputs)) for r in replicas] == [
        (f"echo-stream-{i}", f"v1/chat/completions/echo-stream-{i}", f"cancel/echo-stream-{i}", {f"chunks/echo-stream-{i}"})
        for i in (1, 2, 3)
    ]


def test_an_unknown_config_is_one_default_replica_on_the_plain_outputs() -> None:
    [replica] = discover(None)
    assert (replica.replica_id, replica.request_output, replica.cancel_output) == (
        DEFAULT_REPLICA,
        "v1/chat/completions",
        "cancel",
    )


# -- routing -------------------------------------------------------------------------


def replica_set(n: int = 3) -> ReplicaSet:
    return ReplicaSet([Replica(f"r{i}", f"v1/chat/completions/r{i}", f"cancel/r{i}", frozenset(), frozenset()) for i in range(n)])


def test_ties_go_round_robin_and_the_least_loaded_goes_first() -> None:
    rs = replica_set()
    picked = []
    for i in range(6):
        replica = rs.pick()
        assert replica is not None
        rs.assign(f"q{i}", replica)
        picked.append(replica.replica_id)
    assert picked == ["r0", "r1", "r2", "r0", "r1", "r2"]
    rs.release("q1", completed=True)
    rs.release("q4", completed=True)  # r1 now holds none, the others two each
    assert [rs.pick().replica_id for _ in range(3)] == ["r1", "r1", "r1"]  # type: ignore[union-attr]
    assert rs.by_id["r1"].served == 2


def test_a_dead_replica_is_skipped_and_avoid_holds_unless_it_is_the_only_one_live() -> None:
    rs = replica_set(2)
    rs.replicas[0].live = False
    assert [rs.pick().replica_id for _ in range(3)] == ["r1"] * 3  # type: ignore[union-attr]
    assert rs.pick(avoid="r1").replica_id == "r1"  # type: ignore[union-attr]  # alone: better than nothing
    rs.replicas[0].live = True
    assert [rs.pick(avoid="r1").replica_id for _ in range(3)] == ["r0"] * 3  # type: ignore[union-attr]
    rs.replicas[0].live = rs.replicas[1].live = False
    assert rs.pick() is None


def test_the_oldest_request_a_replica_holds_is_the_oldest_it_was_given_that_has_not_ended() -> None:
    rs = replica_set(2)
    r0, r1 = rs.replicas
    for i in range(5):
        rs.assign(f"q{i}", r0 if i % 2 == 0 else r1)  # r0: q0 q2 q4, r1: q1 q3
    assert rs.oldest_held(r0, set()) == "q0" and rs.oldest_held(r1, set()) == "q1"
    assert rs.oldest_held(r0, {"q0"}) == "q2" and rs.oldest_held(r0, {"q0", "q2", "q4"}) is None
    rs.release("q0", completed=True)
    assert rs.oldest_held(r0, set()) == "q2" and r0.in_flight == 2
    assert rs.take_held(r0) == ["q2", "q4"] and r0.in_flight == 0 and rs.oldest_held(r0, set()) is None
    assert set(rs.holder) == {"q1", "q3"}


def test_a_replica_is_a_legacy_one_until_it_sends_a_hello_or_a_chunk_with_seq() -> None:
    rs = ReplicaSet(discover(replica_config(("a", "b"))))
    legacy = LegacyReplicas(rs)
    assert legacy.replica_of("chunks/a") is rs.by_id["a"] and legacy.replica_of("chunks/b") is rs.by_id["b"]
    assert legacy.replica_of("tick") is None  # not an answer input of any replica
    legacy.numbered.add("chunks/a")
    assert legacy.replica_of("chunks/a") is None and legacy.replica_of("chunks/b") is rs.by_id["b"]
    # No node_config: the one replica answers on every input, a legacy one until any input sent seq.
    alone = LegacyReplicas(ReplicaSet(discover(None)))
    assert alone.replica_of("v1/chat/completions") is not None
    alone.numbered.add("v1/chat/completions")
    assert alone.replica_of("anything") is None


# -- through the app and the bridge --------------------------------------------------------


@asynccontextmanager
async def app_over(node: ReplicaNode, **settings: Any) -> AsyncIterator[tuple[httpx.AsyncClient, Any, DoraBridge]]:
    bridge = DoraBridge(node)
    app = create_app(Settings(sweep_interval_s=0.02, **settings), bridge)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=10) as client:
            yield client, app.state.registry, bridge
        node.push(STOP)
        await wait_until_async(lambda: not reader_of(bridge).is_alive())


async def background(client: httpx.AsyncClient, text: str) -> httpx.Response:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "background": True}
    return await client.post("/v1/chat/completions", json=body)


async def test_each_request_goes_to_one_replica_and_its_cancel_only_to_that_one() -> None:
    node = ReplicaNode(replica_config())
    async with app_over(node) as (client, registry, _):
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(4)]
        assert node.requests() == [
            ("v1/chat/completions/a", ids[0]),
            ("v1/chat/completions/b", ids[1]),
            ("v1/chat/completions/c", ids[2]),
            ("v1/chat/completions/a", ids[3]),
        ]
        await client.post(f"/v1/chat/completions/{ids[1]}/cancel")
        assert node.cancels() == [("cancel/b", ids[1])]
        node.push(*answer(ids[2], "c", ["q2"]))
        await wait_until_async(lambda: registry.get(ids[2]).status is Status.COMPLETED)
        health = (await client.get("/health")).json()
        rows = {r["id"]: r for r in health["replicas"]}
        assert {k: (v["in_flight"], v["served"]) for k, v in rows.items()} == {"a": (2, 0), "b": (0, 0), "c": (0, 1)}
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'oss_replica_in_flight{replica="a"}') == 2
    assert metric(metrics, 'oss_replica_served_total{replica="c"}') == 1


async def test_a_dead_replica_s_unanswered_requests_are_re_sent_elsewhere_and_answered_ones_end() -> None:
    node = ReplicaNode(replica_config())
    async with app_over(node) as (client, registry, bridge):
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(6)]  # a: 0, 3; b: 1, 4; c: 2, 5
        node.push(chunk_event(ids[0], 0, "q0", input_id="chunks/a"))  # q0 has streamed, q3 has not
        await wait_until_async(lambda: registry.get(ids[0]).log.pieces == ["q0"])
        node.push(closed("chunks/a"))
        await wait_until_async(lambda: registry.get(ids[0]).done and len(node.requests()) == 7)
        first = registry.get(ids[0])
        assert first.status is Status.FAILED and first.error.status == 502 and "cut off" in first.error.message
        # q3 went out again under a new wire id, to a live replica (b and c each held two: b is next)
        assert node.requests()[-1] == ("v1/chat/completions/b", f"{ids[3]}~1")
        assert node.cancels() == []  # nobody left on a to tell
        node.push(*answer(f"{ids[3]}~1", "b", ["q3"]))
        await wait_until_async(lambda: registry.get(ids[3]).done)
        assert registry.get(ids[3]).status is Status.COMPLETED and registry.get(ids[3]).log.text == "q3"
        # new requests avoid a
        more = [(await background(client, f"n{i}")).json()["id"] for i in range(2)]
        assert {out for out, rid in node.requests() if rid in more} <= {"v1/chat/completions/b", "v1/chat/completions/c"}
        rows = {r["id"]: r for r in bridge.health()["replicas"]}
        assert rows["a"]["live"] is False and rows["a"]["failures"] == 1 and rows["a"]["retries"] == 1
        # its hello brings it back (what `dora node restart` looks like: the input carries events again)
        node.push(hello("a"))
        await wait_until_async(lambda: bridge.replicas.by_id["a"].live)
        back = (await background(client, "back")).json()["id"]
        assert ("v1/chat/completions/a", back) in node.requests()
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, "oss_retries_total") == 1


async def test_a_node_restarted_by_dora_gets_a_cancel_for_what_it_held_and_is_used_again_after_its_hello() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(2)]  # a: q0, b: q1
        node.push({"type": "NODE_RESTARTED", "id": "a"})
        await wait_until_async(lambda: len(node.requests()) == 3)
        assert node.cancels() == [("cancel/a", ids[0])]  # the new process may get the queued copy: drop it
        assert node.requests()[-1] == ("v1/chat/completions/b", f"{ids[0]}~1")  # another replica first
        # dora drops what is sent to it until the new process has subscribed: not used before its hello
        assert not bridge.replicas.by_id["a"].live and bridge.health()["connected"] is True
        extra = (await background(client, "meanwhile")).json()["id"]
        assert node.requests()[-1] == ("v1/chat/completions/b", extra)
        node.push(hello("a"))
        await wait_until_async(lambda: bridge.replicas.by_id["a"].live)
        # had the new process got the queued copy, its chunks under the old id would never mix in
        node.push(chunk_event(ids[0], 0, "STALE", input_id="chunks/a"), *answer(f"{ids[0]}~1", "b", ["q0"]))
        await wait_until_async(lambda: registry.get(ids[0]).status is Status.COMPLETED)
        assert registry.get(ids[0]).log.text == "q0"
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'oss_dropped_chunks_total{reason="stale"}') == 1


async def test_with_no_replica_live_a_request_waits_model_wait_s_then_503_and_health_recovers() -> None:
    node = ReplicaNode(replica_config(("a",)))
    async with app_over(node, model_wait_s=0.2) as (client, registry, bridge):
        node.push(closed("chunks/a"))
        await wait_until_async(lambda: bridge.lost is not None)
        health = await client.get("/health")
        assert health.status_code == 503 and "the model node is gone" in health.json()["error"]
        refused = await background(client, "anyone?")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "backend_unavailable"
        node.push(hello("a"))
        await wait_until_async(lambda: bridge.lost is None)
        assert (await client.get("/health")).status_code == 200
        accepted = await background(client, "again")
        assert accepted.status_code == 202 and node.requests()[-1] == ("v1/chat/completions/a", accepted.json()["id"])


async def test_an_unanswered_request_waits_for_its_only_replica_to_come_back() -> None:
    node = ReplicaNode(replica_config(("a",)))
    async with app_over(node, model_wait_s=5) as (client, registry, bridge):
        rid = (await background(client, "patience")).json()["id"]
        node.push(closed("chunks/a"))
        await wait_until_async(lambda: bridge.lost is not None)
        node.push(hello("a"))
        await wait_until_async(lambda: len(node.requests()) == 2)
        assert node.requests()[-1] == ("v1/chat/completions/a", f"{rid}~1")
        node.push(*answer(f"{rid}~1", "a", ["patience"]))
        await wait_until_async(lambda: registry.get(rid).status is Status.COMPLETED)
        assert registry.get(rid).log.text == "patience"


async def test_a_hello_from_a_live_replica_means_a_new_process_and_orphans_what_the_old_one_held() -> None:
    """Across machines dora 1.1.0 says nothing of a restart: the new process's hello is the only sign."""
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        node.push(hello("a"), hello("b"))  # the first processes start: nothing held, nothing to do
        await wait_until_async(lambda: bridge.replicas.by_id["b"].hellos == 1)
        assert bridge.replicas.by_id["a"].failures == 0
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(2)]  # a: q0, b: q1
        node.push(hello("a"))  # a restarted: q0 went to the process before
        await wait_until_async(lambda: len(node.requests()) == 3)
        assert node.requests()[-1] == ("v1/chat/completions/b", f"{ids[0]}~1")
        assert bridge.replicas.by_id["a"].live and bridge.replicas.by_id["a"].failures == 1
        node.push(*answer(f"{ids[0]}~1", "b", ["q0"]))
        await wait_until_async(lambda: registry.get(ids[0]).status is Status.COMPLETED)


async def test_a_reply_without_id_or_seq_answers_only_the_oldest_request_of_its_own_legacy_replica() -> None:
    """Legacy misdelivery: such a reply (even an empty array) completed the oldest request waiting on any replica."""
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        node.push(hello("b"))  # b speaks the seq protocol; a never does (a legacy node)
        await wait_until_async(lambda: bridge.replicas.by_id["b"].hellos == 1)
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(4)]  # a: q0, q2; b: q1, q3
        assert [out for out, _ in node.requests()] == [f"v1/chat/completions/{r}" for r in "abab"]
        node.push(unnamed("b", []))  # not from a legacy replica: answers nothing, although q0 has waited longest
        node.push(unnamed("a", ["first"]), unnamed("a", ["second"]), unnamed("a", ["third"]))  # a holds two

        def dropped() -> float:
            return metric(registry.metrics.render().decode(), 'oss_dropped_chunks_total{reason="unknown"}', 0)

        await wait_until_async(lambda: dropped() == 2)  # b's, and a's third: a holds no request any more
        assert [registry.get(i).status for i in ids] == [Status.COMPLETED, Status.IN_PROGRESS] * 2
        assert (registry.get(ids[0]).log.text, registry.get(ids[2]).log.text) == ("first", "second")
