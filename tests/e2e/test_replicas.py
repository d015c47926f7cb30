"""Replicas, failover and recovery against real ``dora run`` dataflows.

``dataflow-replicas.yml`` as shipped (three echo_stream replicas under ``restart_policy:
on-failure``) with ``ECHO_MAX_CONCURRENT`` set, and ``dataflow-stream.yml`` with a restart policy
added to its one model node. A replica is killed by pid: the process whose ``DORA_NODE_CONFIG``
names its node id, among the processes ``dora run`` started. Nothing here asserts on wall-clock
time; every wait is on a condition, with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from openai_stream_protocol.testing import wait_until_async
from tests.dataflow import ROOT, Dataflow
from tests.live import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

REPLICAS = [f"echo-stream-{i}" for i in (1, 2, 3)]
MAX_CONCURRENT = 4


def node_pid(flow: Dataflow, node_id: str) -> int | None:
    """The pid of the process dora started for ``node_id`` (its ``DORA_NODE_CONFIG`` has ``node_id: <id>``)."""
    for pid in flow.node_pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if f"node_id: {node_id}\n".encode() in environ:
            return pid
    return None


def body(text: str, stream: bool = True) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": stream}


def prompt(i: int, words: int) -> str:
    return " ".join(f"p{i}w{j}" for j in range(words))


def served(health: dict[str, Any]) -> dict[str, int]:
    return {r["id"]: r["served"] for r in health["replicas"]}


class Outcome:
    """What one stream delivered: its text, and the error event if it ended with one."""

    def __init__(self) -> None:
        self.text = ""
        self.error: dict[str, Any] | None = None
        self.status = 0
        self.streamed = False
        self.done = False


async def stream_one(client: httpx.AsyncClient, text: str, outcome: Outcome) -> Outcome:
    async with client.stream("POST", "/v1/chat/completions", json=body(text)) as r:
        outcome.status = r.status_code
        if r.status_code != 200:
            outcome.error = json.loads(await r.aread())["error"]
            return outcome
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                outcome.done = True
                break
            event = json.loads(data)
            if "error" in event:
                outcome.error = event["error"]
            elif event["choices"]:
                content = event["choices"][0]["delta"].get("content") or ""
                outcome.text += content
                outcome.streamed = outcome.streamed or bool(content)
    return outcome


@pytest.fixture(scope="module")
def replica_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    env = {r: {"ECHO_TOKEN_DELAY_S": "0.01", "ECHO_MAX_CONCURRENT": str(MAX_CONCURRENT)} for r in REPLICAS}
    with Dataflow(ROOT / "dataflow-replicas.yml", tmp_path_factory.mktemp("replicas"), env=env) as flow:
        yield flow


def test_300_requests_reassemble_exactly_and_each_replica_serves_its_share(replica_flow: Dataflow) -> None:
    flow = replica_flow
    prompts = [prompt(i, 8) for i in range(300)]

    async def run() -> tuple[list[Outcome], dict[str, int], dict[str, int], str]:
        limits = httpx.Limits(max_connections=60)
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=60, limits=limits) as client:
            before = served((await client.get("/health")).json())
            gate = asyncio.Semaphore(60)

            async def one(text: str) -> Outcome:
                async with gate:
                    return await stream_one(client, text, Outcome())

            outcomes = await asyncio.wait_for(asyncio.gather(*(one(p) for p in prompts)), 150)
            after = served((await client.get("/health")).json())
            metrics = (await client.get("/metrics")).text
        return outcomes, before, after, metrics

    outcomes, before, after, metrics = asyncio.run(run())
    assert [o.text for o in outcomes] == prompts
    assert all(o.status == 200 and o.done and o.error is None for o in outcomes)
    shares = {r: (after[r] - before[r]) / len(prompts) for r in REPLICAS}
    assert sum(after[r] - before[r] for r in REPLICAS) == len(prompts)
    assert all(0.20 <= share <= 0.45 for share in shares.values()), shares
    assert metric(metrics, "oss_active_streams") == 0


def test_a_killed_replica_hands_its_unanswered_requests_to_the_others_and_comes_back(replica_flow: Dataflow) -> None:
    """SIGKILL one replica while each holds a full queue.

    Its requests that had a chunk are continued on the others (echo_stream says ``can_continue``:
    the delivered pieces go along and it answers the rest, docs/architecture.md, "Failover"); the
    ones waiting in its queue are re-sent as they were. Every one completes with exactly its text,
    none with an error, none hangs, and dora brings the replica back: it serves again.
    """
    flow = replica_flow
    victim = REPLICAS[1]
    prompts = [prompt(1000 + i, 80) for i in range(45)]  # 15 per replica: 4 generating, 11 waiting
    held: list[int] = []

    async def run() -> tuple[list[Outcome], str, dict[str, Any]]:
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=60, limits=httpx.Limits(max_connections=60)) as client:
            start = (await client.get("/metrics")).text
            outcomes = [Outcome() for _ in prompts]
            tasks = [asyncio.ensure_future(stream_one(client, p, o)) for p, o in zip(prompts, outcomes, strict=True)]

            async def victim_busy() -> bool:
                rows = {r["id"]: r for r in (await client.get("/health")).json()["replicas"]}
                held[:] = [rows[victim]["in_flight"]]
                return held[0] >= 2 * MAX_CONCURRENT and sum(o.streamed for o in outcomes) >= MAX_CONCURRENT

            await wait_until_async(victim_busy, timeout_s=30, interval_s=0.02, what=f"{victim} to hold a queue")
            pid = node_pid(flow, victim)
            assert pid is not None, flow.node_pids()
            os.kill(pid, signal.SIGKILL)
            await asyncio.wait_for(asyncio.gather(*tasks), 90)  # none hangs
            assert await wait_until_async(lambda: _active_is_zero(client), timeout_s=10, what="oss_active_streams back to 0")
            # dora restarts it (a new pid) and it serves again
            await wait_until_async(
                lambda: (p := node_pid(flow, victim)) is not None and p != pid, timeout_s=30, what=f"{victim} restarted"
            )
            before = served((await client.get("/health")).json())[victim]

            async def victim_serves() -> bool:
                await asyncio.gather(*(stream_one(client, prompt(2000 + i, 3), Outcome()) for i in range(6)))
                return served((await client.get("/health")).json())[victim] > before

            await wait_until_async(victim_serves, timeout_s=20, interval_s=0.1, what=f"{victim} to serve again")
            metrics = (await client.get("/metrics")).text
            health = (await client.get("/health")).json()
        return outcomes, metrics + "\n" + _prefixed(start), health

    outcomes, metrics, health = asyncio.run(run())
    assert all(o.done and o.error is None for o in outcomes), [o.error for o in outcomes if o.error]
    assert [o.text for o in outcomes] == prompts  # continued and re-sent ones too: nothing streamed twice or missing
    retries = metric(metrics, "oss_retries_total") - metric(metrics, "start_oss_retries_total", 0)
    continued = metric(metrics, "oss_continuations_total") - metric(metrics, "start_oss_continuations_total", 0)
    assert 1 <= continued <= MAX_CONCURRENT  # only those it was generating had streamed
    assert retries >= 1  # its queue went elsewhere
    # what it held went one way or the other (a batch of MAX_CONCURRENT may have finished just before the kill)
    assert continued + retries >= held[0] - MAX_CONCURRENT, (held, continued, retries)
    rows = {r["id"]: r for r in health["replicas"]}
    assert rows[victim]["live"] and rows[victim]["failures"] == 1 and health["status"] == "ok"
    print(f"failover: {len(outcomes)} completed ({int(retries)} re-sent, {int(continued)} continued)")


async def _active_is_zero(client: httpx.AsyncClient) -> bool:
    return metric((await client.get("/metrics")).text, "oss_active_streams") == 0


def _prefixed(metrics: str) -> str:
    """The same samples renamed ``start_<name>``, so that one text holds both readings."""
    return "\n".join("start_" + line for line in metrics.splitlines() if line and not line.startswith("#"))


def with_restart_policy(spec: dict[str, Any]) -> dict[str, Any]:
    for node in spec["nodes"]:
        if node["id"] == "echo-stream":
            node["restart_policy"] = "on-failure"
    return spec


def test_a_single_model_node_killed_under_a_restart_policy_is_used_again_and_health_recovers(tmp_path: Path) -> None:
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.05"}, "openai-stream-server": {"OPENAI_STREAM_SERVER_MODEL_WAIT_S": "10"}}
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path, env=env, transform=with_restart_policy) as flow:

        async def run() -> tuple[Outcome, Outcome, list[int]]:
            async with httpx.AsyncClient(base_url=flow.base_url, timeout=60) as client:
                cut = Outcome()
                task = asyncio.ensure_future(stream_one(client, prompt(1, 60), cut))
                await wait_until_async(lambda: cut.streamed, timeout_s=20, what="the first stream to stream")
                pid = node_pid(flow, "echo-stream")
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
                after = await stream_one(client, prompt(2, 5), Outcome())  # sent while it is down or coming back
                await asyncio.wait_for(task, 30)
                statuses = []
                for _ in range(3):
                    statuses.append((await client.get("/health")).status_code)
                return cut, after, statuses

        cut, after, statuses = asyncio.run(run())
        health = httpx.get(flow.base_url + "/health", timeout=5).json()
    # Killed mid-answer, the stream is continued by the node's new process once it says hello.
    assert cut.done and cut.error is None and cut.text == prompt(1, 60)
    assert after.done and after.error is None and after.text == prompt(2, 5)
    assert statuses == [200, 200, 200]
    [row] = health["replicas"]
    assert row["id"] == "echo-stream" and row["live"] and row["failures"] == 1 and row["served"] >= 1
