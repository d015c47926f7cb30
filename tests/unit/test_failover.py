"""Failover through the app and the bridge, on a scripted dora node (docs/architecture.md, "Failover").

A replica that dies after it streamed part of an answer hands the answer to another that can continue
it (the delivered pieces travel with the re-sent request); a replica that promised heartbeats and goes
silent is treated as dead until it speaks; busy answers and attempt timeouts go elsewhere; attempts
are bounded, a poison request ends after crashing two replicas, and a breaker keeps a failing replica
away for a growing back-off.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pyarrow as pa
import pytest

from openai_stream_protocol import BUSY, CONTINUE_FROM_KEY, CONTINUED_PIECES_KEY, read_continuation
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server import bridge as bridge_module
from openai_stream_server.app import create_app
from openai_stream_server.bridge import DoraBridge
from openai_stream_server.replicas import BREAKER_BASE_S, BREAKER_FAILURES, DownReason, Replica
from openai_stream_server.settings import Settings
from openai_stream_server.state import Status
from tests.live import metric
from tests.unit.test_bridge import STOP, chunk_event, reader_of
from tests.unit.test_replicas import ReplicaNode, answer, background, closed, replica_config

pytestmark = pytest.mark.timeout(30)


async def until(predicate: Any, timeout_s: float = 5.0) -> bool:
    """Whether ``predicate`` came true within ``timeout_s`` (polled on the loop)."""
    try:
        await wait_until_async(predicate, timeout_s)
    except AssertionError:
        return False
    return True


@asynccontextmanager
async def app_over(
    node: ReplicaNode, *, silence_s: float = 0.0, **settings: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Any, DoraBridge]]:
    bridge = DoraBridge(node, replica_silence_s=silence_s)
    app = create_app(Settings(sweep_interval_s=0.02, **settings), bridge)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=10) as client:
            yield client, app.state.registry, bridge
        node.push(STOP)
        await wait_until_async(lambda: not reader_of(bridge).is_alive())


def status(replica: str, kind: str = "hello", **metadata: Any) -> dict[str, Any]:
    """A hello (by default saying it can continue and sends heartbeats) or a heartbeat on the replica's chunk input."""
    if kind == "hello":
        metadata = {"can_continue": True, "heartbeat_s": 0.25, **metadata}
    return {
        "type": "INPUT",
        "id": f"chunks/{replica}",
        "value": pa.array([], type=pa.string()),
        "metadata": {kind: replica, **metadata},
    }


def sent_request(node: ReplicaNode, wire_id: str) -> tuple[str, dict[str, Any]]:
    """(output, metadata) of the request sent under ``wire_id``."""
    [found] = [(out, md) for out, _, md in node.sent if out.startswith("v1/chat/completions") and md["request_id"] == wire_id]
    return found


async def introduce(node: ReplicaNode, bridge: DoraBridge, *replicas: str, **metadata: Any) -> None:
    node.push(*(status(r, **metadata) for r in replicas))
    assert await until(lambda: all(bridge.replicas.by_id[r].hellos for r in replicas))


# -- continuation ------------------------------------------------------------------------------------


async def test_a_replica_that_dies_mid_answer_hands_the_rest_to_one_that_can_continue() -> None:
    node = ReplicaNode(replica_config())
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", "c")
        rid = (await background(client, "one two three four")).json()["id"]
        assert sent_request(node, rid)[0] == "v1/chat/completions/a"
        node.push(chunk_event(rid, 0, "one", input_id="chunks/a"), chunk_event(rid, 1, " two", input_id="chunks/a"))
        # One that came early (seq 3) dies with its replica: the continuation numbers on from what was delivered.
        node.push(chunk_event(rid, 3, " four", input_id="chunks/a"))
        assert await until(lambda: registry.get(rid).log.pieces == ["one", " two"] and registry.get(rid).reorder.held)
        node.push(closed("chunks/a"))
        assert await until(lambda: any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent))
        output, metadata = sent_request(node, f"{rid}~1")
        assert output == "v1/chat/completions/b"
        assert metadata[CONTINUE_FROM_KEY] == 2 and json.loads(metadata[CONTINUED_PIECES_KEY]) == ["one", " two"]
        continuation = read_continuation(metadata)
        assert continuation is not None and continuation.text == "one two"
        state = registry.get(rid)
        assert not state.reorder.held and state.status is Status.IN_PROGRESS  # no error, nothing mixed in
        # b answers the rest, numbered on; a late chunk of the dead attempt is stale.
        node.push(
            chunk_event(rid, 2, " LATE", input_id="chunks/a"),
            chunk_event(f"{rid}~1", 2, " three", input_id="chunks/b"),
            chunk_event(f"{rid}~1", 3, " four", input_id="chunks/b", fin=True, finish_reason="stop", completion_tokens=2),
        )
        assert await until(lambda: state.done)
        assert state.status is Status.COMPLETED and state.log.text == "one two three four"
        assert state.log.finish_reason == "stop" and state.log.usage["completion_tokens"] == 4  # 2 delivered + 2 of b's
        body = (await client.get(f"/v1/chat/completions/{rid}")).json()
        assert body["choices"][0]["message"]["content"] == "one two three four"
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, "oss_continuations_total") == 1 and metric(metrics, "oss_retries_total") == 0
    assert metric(metrics, 'oss_dropped_chunks_total{reason="stale"}') == 1


async def test_tool_call_and_reasoning_pieces_keep_their_kind_in_the_continuation() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b")
        rid = (await background(client, "think, then call")).json()["id"]
        node.push(
            chunk_event(rid, 0, "hmm", input_id="chunks/a", kind="reasoning"),
            chunk_event(rid, 1, '{"x": ', input_id="chunks/a", tool_call_index=0, tool_call_id="c1", tool_call_name="f"),
        )
        assert await until(lambda: len(registry.get(rid).log.pieces) == 2)
        node.push(closed("chunks/a"))
        assert await until(lambda: any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent))
        continuation = read_continuation(sent_request(node, f"{rid}~1")[1])
        assert continuation is not None
        assert [(p.text, p.reasoning, p.tool_call) for p in continuation.pieces][0] == ("hmm", True, None)
        call = continuation.pieces[1].tool_call
        assert call is not None and (call.index, call.id, call.name) == (0, "c1", "f")


async def test_with_no_replica_that_can_continue_a_started_answer_is_cut_off_as_before() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a")
        node.push(status("b", can_continue=False))
        assert await until(lambda: bridge.replicas.by_id["b"].hellos == 1)
        rid = (await background(client, "x y")).json()["id"]
        node.push(chunk_event(rid, 0, "x", input_id="chunks/a"))
        assert await until(lambda: registry.get(rid).log.pieces == ["x"])
        node.push(closed("chunks/a"))
        assert await until(lambda: registry.get(rid).done)
        state = registry.get(rid)
        assert state.status is Status.FAILED and "cut off" in state.error.message
        assert not any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent)


# -- silence -----------------------------------------------------------------------------------------


async def test_a_silent_replica_is_down_until_it_speaks_and_its_requests_go_on_elsewhere() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node, silence_s=0.3) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b")
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(2)]  # a: q0, b: q1
        node.push(chunk_event(ids[0], 0, "q0", input_id="chunks/a"))
        a = bridge.replicas.by_id["a"]
        # b keeps beating; a says nothing more (stopped): after 0.3 s it is down and q0 is continued on b.
        for _ in range(20):
            node.push(status("b", "heartbeat", active=1, queued=0, can_continue=True))
            await asyncio.sleep(0.05)
            if not a.live:
                break
        assert not a.live and a.down_reason is DownReason.SILENT and bridge.replicas.by_id["b"].live
        assert await until(lambda: any(md["request_id"] == f"{ids[0]}~1" for _, _, md in node.sent))
        assert sent_request(node, f"{ids[0]}~1")[0] == "v1/chat/completions/b"
        assert ("cancel/a", ids[0]) in node.cancels()  # should it resume, it drops the request
        assert registry.get(ids[1]).status is Status.IN_PROGRESS  # b's own request is untouched
        extra = (await background(client, "meanwhile")).json()["id"]
        assert sent_request(node, extra)[0] == "v1/chat/completions/b"  # no new work for a
        node.push(status("a", "heartbeat", active=1, queued=0, can_continue=True))  # SIGCONT: it speaks again
        assert await until(lambda: a.live)
        back = (await background(client, "back")).json()["id"]
        assert sent_request(node, back)[0] == "v1/chat/completions/a"
        assert (await client.get("/health")).json()["replicas"][0]["down_reason"] is None


async def test_a_replica_that_never_promised_heartbeats_is_never_judged_by_its_silence() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node, silence_s=0.1) as (client, registry, bridge):
        node.push(status("a", heartbeat_s=None), status("b", heartbeat_s=None))  # hellos without heartbeat_s
        assert await until(lambda: bridge.replicas.by_id["b"].hellos == 1)
        rid = (await background(client, "slow")).json()["id"]
        await asyncio.sleep(0.5)
        assert bridge.replicas.by_id["a"].live and registry.get(rid).status is Status.IN_PROGRESS
        assert len([1 for out, _, _ in node.sent if out.startswith("v1/chat/completions")]) == 1


# -- busy, attempt timeouts, bounded attempts -------------------------------------------------------------


def busy(wire_id: str, replica: str) -> dict[str, Any]:
    return chunk_event(
        wire_id, 0, "", input_id=f"chunks/{replica}", fin=True, finish_reason="error", error="queue full", error_code=BUSY
    )


async def test_a_busy_answer_sends_the_request_to_another_replica_and_counts_against_the_busy_one() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b")
        rid = (await background(client, "hello")).json()["id"]
        node.push(busy(rid, "a"))
        assert await until(lambda: any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent))
        output, metadata = sent_request(node, f"{rid}~1")
        assert output == "v1/chat/completions/b" and CONTINUE_FROM_KEY not in metadata  # nothing delivered: as it was
        assert bridge.replicas.by_id["a"].streak == 1 and bridge.replicas.by_id["a"].in_flight == 0
        node.push(*answer(f"{rid}~1", "b", ["hello"]))
        assert await until(lambda: registry.get(rid).done)
        assert registry.get(rid).status is Status.COMPLETED and registry.get(rid).log.text == "hello"


async def test_busy_everywhere_ends_after_max_attempts_with_503() -> None:
    node = ReplicaNode(replica_config(("a", "b", "c")))
    async with app_over(node, max_attempts=2) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", "c")
        rid = (await background(client, "hello")).json()["id"]
        node.push(busy(rid, "a"))
        assert await until(lambda: any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent))
        replica = sent_request(node, f"{rid}~1")[0].rsplit("/", 1)[1]
        node.push(busy(f"{rid}~1", replica))
        assert await until(lambda: registry.get(rid).done)
        state = registry.get(rid)
        assert state.status is Status.FAILED and state.error.status == 503 and "queue full" in state.error.message
        assert not any(md["request_id"] == f"{rid}~2" for _, _, md in node.sent)  # 2 sends, no third


async def test_a_busy_answer_from_the_only_replica_is_a_503() -> None:
    node = ReplicaNode(replica_config(("a",)))
    async with app_over(node) as (client, registry, bridge):
        rid = (await background(client, "hello")).json()["id"]
        node.push(busy(rid, "a"))
        assert await until(lambda: registry.get(rid).done)
        assert registry.get(rid).error.status == 503 and registry.get(rid).error.code == "server_overloaded"


async def test_no_chunk_within_the_attempt_timeout_moves_the_request_only_when_another_replica_can_take_it() -> None:
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node, attempt_timeout_s=0.2) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b")
        rid = (await background(client, "hello")).json()["id"]
        assert await until(lambda: any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent), timeout_s=5)
        assert sent_request(node, f"{rid}~1")[0] == "v1/chat/completions/b"
        assert ("cancel/a", rid) in node.cancels()
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'oss_timeouts_total{kind="attempt"}') == 1

    alone = ReplicaNode(replica_config(("a",)))
    async with app_over(alone, attempt_timeout_s=0.1) as (client, registry, bridge):
        rid = (await background(client, "hello")).json()["id"]
        await asyncio.sleep(0.4)
        assert registry.get(rid).status is Status.IN_PROGRESS and alone.cancels() == []  # nowhere else: it waits


# -- poison requests and the breaker -------------------------------------------------------------------


async def test_a_request_that_crashes_two_replicas_ends_and_never_reaches_the_third() -> None:
    node = ReplicaNode(replica_config())
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b", "c")
        rid = (await background(client, "poison")).json()["id"]
        node.push(closed("chunks/a"))
        assert await until(lambda: any(md["request_id"] == f"{rid}~1" for _, _, md in node.sent))
        second = sent_request(node, f"{rid}~1")[0].rsplit("/", 1)[1]
        node.push(closed(f"chunks/{second}"))
        assert await until(lambda: registry.get(rid).done)
        state = registry.get(rid)
        assert state.status is Status.FAILED and state.error.message == "the request crashed 2 model replicas"
        assert state.error.code == "upstream_error"
        assert [md["request_id"] for out, _, md in node.sent if out.startswith("v1/chat/completions")] == [rid, f"{rid}~1"]
        metrics = (await client.get("/metrics")).text
    assert metric(metrics, "oss_poison_requests_total") == 1


def test_the_breaker_skips_a_replica_after_three_failures_for_a_back_off_that_doubles() -> None:
    replica = Replica("a", "out", None, frozenset(), frozenset())
    for _ in range(BREAKER_FAILURES - 1):
        replica.failed(100.0)
    assert replica.skip_until == 0.0
    replica.failed(100.0)
    assert replica.skip_until == 100.0 + BREAKER_BASE_S
    replica.failed(200.0)
    assert replica.skip_until == 200.0 + 2 * BREAKER_BASE_S
    replica.succeeded()
    assert (replica.streak, replica.skip_until) == (0, 0.0)


async def test_a_failing_send_output_counts_against_that_replica_and_the_next_one_is_tried() -> None:
    class Refusing(ReplicaNode):
        def send_output(self, output_id: str, data: Any, metadata: dict[str, Any] | None = None) -> None:
            if output_id == "v1/chat/completions/a":
                raise RuntimeError("send failed")
            super().send_output(output_id, data, metadata)

    node = Refusing(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        ids = [(await background(client, f"q{i}")).json()["id"] for i in range(BREAKER_FAILURES)]
        assert [sent_request(node, rid)[0] for rid in ids] == ["v1/chat/completions/b"] * BREAKER_FAILURES
        a = bridge.replicas.by_id["a"]
        assert a.streak == BREAKER_FAILURES and a.skip_until > 0  # the breaker is open: a is no longer tried first
        assert (await client.get("/health")).json()["replicas"][0]["backoff_s"] > 0


# -- restarts: hello-gated -------------------------------------------------------------------------------


async def test_a_restarted_node_that_sends_hellos_is_used_again_on_its_hello_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bridge_module, "RESTART_GRACE_S", 0.05)
    node = ReplicaNode(replica_config(("a", "b")))
    async with app_over(node) as (client, registry, bridge):
        await introduce(node, bridge, "a", "b")
        node.push({"type": "NODE_RESTARTED", "id": "a"})
        a = bridge.replicas.by_id["a"]
        assert await until(lambda: not a.live)
        node.push(chunk_event("someone", 0, "left in the queue", input_id="chunks/a"))
        await asyncio.sleep(0.3)  # past the grace a node without hellos gets
        assert not a.live
        node.push(status("a"))
        assert await until(lambda: a.live)
