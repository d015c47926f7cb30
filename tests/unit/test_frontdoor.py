"""Several server processes (docs/architecture.md, "Several server processes"): one port, which process answered,
replicas that answer each server on its own output, routing on the replicas' reported load.

The port tests bind real sockets on 127.0.0.1; the rest run the app over the scripted ``FakeNode`` of
``test_bridge.py`` with a server node config in the multi-server layout.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pytest

from openai_stream_protocol import SERVER_KEY
from openai_stream_protocol.testing import wait_until_async
from openai_stream_server.app import create_app
from openai_stream_server.bridge import DoraBridge
from openai_stream_server.frontdoor import BindError, ServerIdentity, listen_socket, per_server_replicas, server_place
from openai_stream_server.replicas import LOAD_STALE_S, Replica, ReplicaSet
from openai_stream_server.settings import Settings, load_settings
from openai_stream_server.state import Status
from openai_stream_server.store.base import LogBatch, StoreOptions
from openai_stream_server.store.keeper import RecordKeeper
from openai_stream_server.store.record import CompletionRecord
from openai_stream_server.store.redis_store import RedisStore
from tests.live import metric
from tests.redis_server import running_redis
from tests.unit.test_bridge import STOP, reader_of
from tests.unit.test_replicas import ReplicaNode

pytestmark = pytest.mark.timeout(30)

SERVER = "srv-2"


def frontdoor_config(server: str = SERVER, replicas: tuple[str, ...] = ("a", "b"), *, own_outputs: bool = True) -> dict[str, Any]:
    """Server ``server``'s node config: its request/cancel pair per replica; each replica answers on ``chunks/<server>``."""
    output = f"chunks/{server}" if own_outputs else "chunks"
    inputs: dict[str, Any] = {f"chunks/{r}": {"source": f"{r}/{output}"} for r in replicas}
    inputs["tick"] = "dora/timer/millis/500"
    return {"inputs": inputs, "outputs": [o for r in replicas for o in (f"v1/chat/completions/{r}", f"cancel/{r}")]}


# -- the port ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_with_reuse_port_two_processes_listen_on_one_port_and_both_are_reached() -> None:
    port = free_port()
    one = listen_socket("127.0.0.1", port, reuse_port=True)
    two = listen_socket("127.0.0.1", port, reuse_port=True)
    try:
        one.setblocking(True)
        two.setblocking(True)
        one.settimeout(0.05)
        two.settimeout(0.05)
        accepted = {"one": 0, "two": 0}
        for _ in range(64):  # the kernel hashes each connection's addresses: 64 reach both (2^-63 that they do not)
            with socket.create_connection(("127.0.0.1", port), timeout=2):
                for name, listener in (("one", one), ("two", two)):
                    try:
                        conn, _ = listener.accept()
                    except TimeoutError:
                        continue
                    conn.close()
                    accepted[name] += 1
        assert accepted["one"] > 0 and accepted["two"] > 0 and sum(accepted.values()) == 64
    finally:
        one.close()
        two.close()


@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "reuse-port"])
def test_a_port_taken_without_reuse_port_refuses_with_a_clear_error(reuse_port: bool) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with pytest.raises(BindError, match=rf"cannot listen on 127\.0\.0\.1:{port}: address already in use") as caught:
            listen_socket("127.0.0.1", port, reuse_port=reuse_port)
    assert "--reuse-port" in str(caught.value)


def test_reuse_port_without_linux_refuses_to_start() -> None:
    with pytest.raises(BindError, match="needs Linux's SO_REUSEPORT.*darwin"):
        listen_socket("127.0.0.1", 0, reuse_port=True, platform="darwin")


def test_the_server_refuses_to_start_on_a_taken_port_before_it_joins_a_dataflow() -> None:
    """The console script with a taken port: one line on stderr, status 2, and no attempt at ``Node()`` (it would
    fail differently outside a dataflow)."""
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "openai_stream_server.main", "--port", str(port), "--reuse-port"],
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith(f"openai-stream-server: error: cannot listen on 127.0.0.1:{port}: address already in use")
    assert "Traceback" not in done.stderr


def test_reuse_port_is_a_setting() -> None:
    assert load_settings(["--reuse-port"], {}).reuse_port is True
    assert load_settings([], {"OPENAI_STREAM_SERVER_REUSE_PORT": "1"}).reuse_port is True
    assert Settings().reuse_port is False


# -- which server answered -----------------------------------------------------------


@asynccontextmanager
async def app_over(node: ReplicaNode, server: str = SERVER) -> AsyncIterator[tuple[httpx.AsyncClient, DoraBridge]]:
    bridge = DoraBridge(node, server_id=server)
    app = create_app(Settings(sweep_interval_s=0.02), bridge, identity=ServerIdentity(server, "host-1", 4242))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=10) as client:
            yield client, bridge
        node.push(STOP)
        await wait_until_async(lambda: not reader_of(bridge).is_alive())


async def test_health_and_metrics_name_the_server_process() -> None:
    async with app_over(ReplicaNode(frontdoor_config())) as (client, _):
        health = (await client.get("/health")).json()
        metrics = (await client.get("/metrics")).text
    assert health["server"] == {"name": SERVER, "host": "host-1", "pid": 4242}
    assert metric(metrics, 'oss_server_info{host="host-1",pid="4242",server="srv-2"}') == 1


# -- replicas shared by several servers ----------------------------------------------


def test_per_server_replicas_are_those_whose_answers_come_on_this_servers_output() -> None:
    config = frontdoor_config(replicas=("a", "b"))
    config["inputs"]["chunks/c"] = {"source": "c/chunks"}  # a replica of the single-server kind
    config["inputs"]["chunks/d"] = "d/chunks/srv-1"  # another server's output: not ours
    assert per_server_replicas(config, SERVER) == {"a", "b"}
    assert per_server_replicas(config, "") == frozenset() and per_server_replicas(None, SERVER) == frozenset()


async def background(client: httpx.AsyncClient, text: str) -> str:
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "background": True}
    return str((await client.post("/v1/chat/completions", json=body)).json()["id"])


@pytest.mark.parametrize("own_outputs", [True, False], ids=["own-outputs", "single-server-layout"])
async def test_a_request_names_this_server_only_to_replicas_that_answer_on_its_own_output(own_outputs: bool) -> None:
    node = ReplicaNode(frontdoor_config(own_outputs=own_outputs))
    async with app_over(node) as (client, _):
        await background(client, "hello")
        [(output, _, metadata)] = [m for m in node.sent if m[0].startswith("v1/chat/completions")]
    # srv-2 is second among several servers: ties start at its place (ReplicaSet.spread); alone, at the first.
    assert output == ("v1/chat/completions/b" if own_outputs else "v1/chat/completions/a")
    assert metadata.get(SERVER_KEY) == (SERVER if own_outputs else None)


def heartbeat(replica: str, active: int, queued: int = 0) -> dict[str, Any]:
    metadata = {"heartbeat": replica, "active": active, "queued": queued}
    return {"type": "INPUT", "id": f"chunks/{replica}", "value": pa.array([], type=pa.string()), "metadata": metadata}


async def test_requests_go_to_the_replica_the_heartbeats_say_is_least_loaded_over_all_servers() -> None:
    """Another server keeps ``a`` busy: this one sees it only in ``a``'s heartbeats, and sends its requests to ``b``."""
    node = ReplicaNode(frontdoor_config())
    async with app_over(node) as (client, bridge):
        node.push(heartbeat("a", 5, 2), heartbeat("b", 1))
        await wait_until_async(lambda: all(r.load is not None for r in bridge.replicas.replicas))
        for i in range(5):
            await background(client, f"q{i}")
        sent = [out for out, _, _ in node.sent if out.startswith("v1/chat/completions")]
    # b: 1 reported + ours; a: 7 reported. Five requests take b to 6, and the sixth would tie.
    assert sent == ["v1/chat/completions/b"] * 5


def test_routing_load_is_our_requests_plus_what_the_last_heartbeat_says_others_hold() -> None:
    rs = ReplicaSet([Replica(r, f"v1/chat/completions/{r}", None, frozenset(), frozenset()) for r in ("a", "b")])
    a, b = rs.replicas
    now = time.monotonic()
    rs.assign("x", a)
    assert a.routing_load(now) == 1  # no heartbeat: what this server knows
    a.load, a.load_at, a.load_base = (4, 1), now, 1  # 5 held when it reported, one of them ours
    rs.assign("y", a)
    assert a.routing_load(now) == 6  # and ours sent since
    rs.release("x", completed=True)
    rs.release("y", completed=True)
    assert a.routing_load(now) == 4  # ours ended: the others' 4 stay
    assert a.routing_load(now + LOAD_STALE_S + 0.1) == 0  # a report not renewed is not believed
    b.load, b.load_at, b.load_base = (0, 0), now, 0
    rs.assign("z", b)
    rs.assign("w", b)
    assert b.routing_load(now) == 2  # never below ours (one server: in flight, as before)
    assert rs.pick() is b and rs.pick() is b  # a reads 4


# -- a server process that died in flight --------------------------------------------


async def test_a_completion_whose_process_died_reads_back_with_what_its_live_log_holds(tmp_path: Path) -> None:
    """Its record was written when it opened (no pieces); its pieces went to the live log as they came. Read anywhere
    once its process is gone, it has those pieces and the error, and the record is written back with them."""
    with running_redis(tmp_path / "redis") as redis:
        dead, reader = RedisStore(redis.url, StoreOptions()), RedisStore(redis.url, StoreOptions())
        await dead.start()
        await reader.start()
        try:
            opened = CompletionRecord("chatcmpl-dead", "chat", "m", 1, prompt_tokens=3, instance="deadbeefdeadbeef")
            dead.put(opened)
            dead.append(opened.id, LogBatch(0, ["one ", "two "], {}, set()))
            dead.append(opened.id, LogBatch(2, ["three"], {}, set()))
            await dead.flush()
            keeper = RecordKeeper(reader)
            state = await keeper.lookup(opened.id)
            assert state is not None and state.status is Status.FAILED
            assert state.log.pieces == ["one ", "two ", "three"]
            assert state.error is not None and state.error.code == "server_restarted"
            await reader.flush()
            again = await reader.get(opened.id)
            assert again is not None and again.pieces == ["one ", "two ", "three"] and again.status == "failed"
        finally:
            await dead.aclose()
            await reader.aclose()


def test_servers_deciding_at_once_on_the_same_loads_pick_different_replicas() -> None:
    """Two servers in lockstep (their clients' requests start and end together) see the same heartbeat loads: ties
    broken from each server's place keep them apart, where plain round robin herded both onto one replica."""

    def servers(spread: list[int | None]) -> list[ReplicaSet]:
        sets = []
        for place in spread:
            rs = ReplicaSet([Replica(r, f"v1/chat/completions/{r}", None, frozenset(), frozenset()) for r in ("a", "b", "c")])
            rs.spread = place
            sets.append(rs)
        return sets

    for spread, collide in (([0, 1], False), ([None, None], True)):
        one, two = servers(spread)
        for turn in range(9):
            first, second = one.pick(), two.pick()
            assert first is not None and second is not None
            assert (first.replica_id == second.replica_id) is collide, (spread, turn)
    assert [server_place(s) for s in ("openai-stream-server-1", "openai-stream-server-3")] == [0, 2]
    assert server_place("front") == server_place("front") >= 0


async def test_a_record_written_a_moment_after_the_lookup_began_is_found(tmp_path: Path) -> None:
    """Another process answered its 202 before its opened record reached Redis: a miss is read again briefly."""
    with running_redis(tmp_path / "redis") as redis:
        owner, reader = RedisStore(redis.url, StoreOptions()), RedisStore(redis.url, StoreOptions())
        await owner.start()
        await reader.start()
        try:
            keeper = RecordKeeper(reader)

            async def write_late() -> None:
                await asyncio.sleep(0.05)
                owner.put(CompletionRecord("chatcmpl-late", "chat", "m", 1, prompt_tokens=1))
                await owner.flush()

            writer = asyncio.ensure_future(write_late())
            state = await keeper.lookup("chatcmpl-late")
            await writer
            assert state is not None and state.request_id == "chatcmpl-late"
            assert await keeper.lookup("chatcmpl-never") is None
        finally:
            await owner.aclose()
            await reader.aclose()
