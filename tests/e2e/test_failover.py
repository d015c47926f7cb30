"""Failover without a break, against real ``dora run`` dataflows (docs/architecture.md, "Failover").

``dataflow-replicas.yml`` as shipped: three echo_stream replicas under ``restart_policy: on-failure``,
each saying in its hello that it can continue an answer and sending heartbeats while it holds
requests. A replica is killed (SIGKILL), stopped (SIGSTOP) or crashed by a poison request
(``ECHO_EXIT_ON``), or answers busy (``ECHO_BUSY``); every stream must still arrive whole, word by
word, with no error event and one finish. Waits are on conditions with deadlines; the times the
continuations took are printed, not asserted (benchmarks/replicas.py measures them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from openai_stream_protocol.testing import wait_until_async
from tests.dataflow import ROOT, Dataflow
from tests.e2e.test_replicas import node_pid
from tests.live import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

REPLICAS = [f"echo-stream-{i}" for i in (1, 2, 3)]
POISON = "poison-pill"
SILENCE_S = 1.0
WORDS = 30


def words(i: int, n: int = WORDS) -> str:
    return " ".join(f"s{i}w{j}" for j in range(n))


class Stream:
    """One streamed completion as the client saw it: every content delta, errors, finishes, usage, arrival times."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.deltas: list[str] = []
        self.arrivals: list[float] = []
        self.errors: list[dict[str, Any]] = []
        self.finishes: list[str] = []
        self.usage: dict[str, Any] | None = None
        self.status = 0
        self.done = False

    @property
    def got(self) -> str:
        return "".join(self.deltas)

    @property
    def exact(self) -> bool:
        """Word by word the echo, nothing twice, nothing missing, no error, one finish.

        A slow reader's deltas may hold several words: the server coalesces what is pending
        (docs/architecture.md, "Slow clients: coalescing, not queues").
        """
        return self.got.split(" ") == self.text.split(" ") and self.finishes == ["stop"] and not self.errors and self.done


async def stream(client: httpx.AsyncClient, s: Stream) -> Stream:
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": s.text}],
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        s.status = r.status_code
        if r.status_code != 200:
            s.errors.append(json.loads(await r.aread())["error"])
            return s
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                s.done = True
                break
            event = json.loads(data)
            if "error" in event:
                s.errors.append(event["error"])
                continue
            if event.get("usage"):
                s.usage = event["usage"]
            for choice in event["choices"]:
                content = choice["delta"].get("content")
                if content:
                    s.deltas.append(content)
                    s.arrivals.append(time.monotonic())
                if choice.get("finish_reason"):
                    s.finishes.append(choice["finish_reason"])
    return s


async def health_rows(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in (await client.get("/health")).json()["replicas"]}


def gaps_after(streams: list[Stream], at: float) -> list[float]:
    """For each stream that had a chunk before ``at`` and one after: how long after ``at`` its next chunk came."""
    out = []
    for s in streams:
        before = [t for t in s.arrivals if t <= at]
        after = [t for t in s.arrivals if t > at]
        if before and after:
            out.append(after[0] - at)
    return sorted(out)


def victims_gaps(streams: list[Stream], at: float, pause_s: float = 0.15) -> list[float]:
    """``gaps_after`` for the streams the event paused: those whose next chunk came more than ``pause_s`` (3 tokens of
    this flow's pace) after it. The client cannot see which replica served a stream; this is how it tells."""
    return [gap for gap in gaps_after(streams, at) if gap > pause_s]


def quantile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    env: dict[str, dict[str, Any]] = {r: {"ECHO_TOKEN_DELAY_S": "0.05", "ECHO_EXIT_ON": POISON} for r in REPLICAS}
    env["openai-stream-server"] = {"OPENAI_STREAM_SERVER_REPLICA_SILENCE_S": str(SILENCE_S)}
    with Dataflow(ROOT / "dataflow-replicas.yml", tmp_path_factory.mktemp("failover"), env=env) as flow:
        yield flow


def test_sigkill_mid_answer_every_stream_completes_word_by_word_with_one_finish(flow: Dataflow) -> None:
    victim = REPLICAS[0]
    streams = [Stream(words(i)) for i in range(200)]

    async def run() -> tuple[str, str, float, set[int]]:
        limits = httpx.Limits(max_connections=250)
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=120, limits=limits) as client:
            start = (await client.get("/metrics")).text
            tasks = [asyncio.ensure_future(stream(client, s)) for s in streams]

            async def mid_answer() -> bool:  # the victim holds many streams, most of them part-way through
                rows = await health_rows(client)
                return rows[victim]["in_flight"] >= 40 and sum(bool(s.deltas) for s in streams) >= 150

            await wait_until_async(mid_answer, timeout_s=60, interval_s=0.05, what=f"{victim} to hold streams mid-answer")
            pid = node_pid(flow, victim)
            assert pid is not None
            streaming = {i for i, s in enumerate(streams) if s.deltas}
            os.kill(pid, signal.SIGKILL)
            killed_at = time.monotonic()
            await asyncio.wait_for(asyncio.gather(*tasks), 120)
            end = (await client.get("/metrics")).text
        return start, end, killed_at, streaming

    start, end, killed_at, streaming = asyncio.run(run())
    broken = [(s.text, s.deltas, s.errors, s.finishes) for s in streams if not s.exact]
    assert broken == [], broken[:3]
    assert all(s.usage is not None and s.usage["completion_tokens"] == WORDS for s in streams)
    assert all(s.usage is not None and s.usage["prompt_tokens"] == WORDS for s in streams)
    continued = metric(end, "oss_continuations_total") - metric(start, "oss_continuations_total", 0)
    assert continued >= 1
    gaps = gaps_after([streams[i] for i in streaming], killed_at)  # every stream's, not only the victim's
    print(f"SIGKILL: {int(continued)} continued; next chunk of any stream after the kill p99 {quantile(gaps, 0.99):.3f} s")


def test_sigstop_its_streams_continue_elsewhere_and_after_sigcont_it_serves_again(flow: Dataflow) -> None:
    victim = REPLICAS[1]
    streams = [Stream(words(1000 + i)) for i in range(60)]

    async def run() -> tuple[str, str, float, dict[str, Any], int]:
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
            await wait_until_async(
                lambda: _all_live(client), timeout_s=30, what="every replica live (an earlier test restarted one)"
            )
            start = (await client.get("/metrics")).text
            tasks = [asyncio.ensure_future(stream(client, s)) for s in streams]

            async def mid_answer() -> bool:
                rows = await health_rows(client)
                return rows[victim]["in_flight"] >= 10 and sum(bool(s.deltas) for s in streams) >= 40

            await wait_until_async(mid_answer, timeout_s=60, interval_s=0.05, what=f"{victim} to hold streams mid-answer")
            pid = node_pid(flow, victim)
            assert pid is not None
            os.kill(pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            try:
                await asyncio.wait_for(asyncio.gather(*tasks), 120)
                rows = await health_rows(client)
            finally:
                os.kill(pid, signal.SIGCONT)
            down = rows[victim]
            before = rows[victim]["served"]

            async def victim_serves() -> bool:
                await asyncio.gather(*(stream(client, Stream(words(2000 + i, 3))) for i in range(6)))
                return (await health_rows(client))[victim]["served"] > before

            await wait_until_async(victim_serves, timeout_s=30, interval_s=0.1, what=f"{victim} to serve again after SIGCONT")
            end = (await client.get("/metrics")).text
        return start, end, stopped_at, down, pid

    start, end, stopped_at, down, pid = asyncio.run(run())
    broken = [(s.text, s.deltas, s.errors) for s in streams if not s.exact]
    assert broken == [], broken[:3]
    assert not down["live"] and down["down_reason"] == "silent"  # silence, not a timeout, moved them
    assert metric(end, 'oss_timeouts_total{kind="idle"}', 0) == metric(start, 'oss_timeouts_total{kind="idle"}', 0)
    assert metric(end, "oss_continuations_total") > metric(start, "oss_continuations_total", 0)
    assert node_pid(flow, victim) == pid  # the same process serves again: it was stopped, not restarted
    gaps = victims_gaps(streams, stopped_at)
    print(
        f"SIGSTOP (--replica-silence-s {SILENCE_S:g}): next chunk after the stop "
        f"p50 {quantile(gaps, 0.5):.3f} s p99 {quantile(gaps, 0.99):.3f} s"
    )


async def _all_live(client: httpx.AsyncClient) -> bool:
    return all(r["live"] for r in (await health_rows(client)).values())


def test_a_poison_request_fails_after_crashing_two_replicas_and_never_reaches_the_third(flow: Dataflow) -> None:
    async def run() -> tuple[Stream, dict[int, str], dict[str, int | None], str, str]:
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=60) as client:
            await wait_until_async(lambda: _all_live(client), timeout_s=30, what="every replica live")
            pids = {r: node_pid(flow, r) for r in REPLICAS}
            start = (await client.get("/metrics")).text
            poisoned = await stream(client, Stream(f"{POISON} and more"))
            after = {r: node_pid(flow, r) for r in REPLICAS}
            ok = await stream(client, Stream(words(3000)))  # the others still serve
            assert ok.exact, (ok.deltas, ok.errors)
            end = (await client.get("/metrics")).text
        return poisoned, {}, {r: (pids[r], after[r]) for r in REPLICAS}, start, end  # type: ignore[misc]

    poisoned, _, pids, start, end = asyncio.run(run())
    [error] = poisoned.errors
    assert error["code"] == "upstream_error" and error["message"] == "the request crashed 2 model replicas", error
    assert poisoned.deltas == []
    crashed = [r for r, (before, after) in pids.items() if before != after]  # type: ignore[misc]
    assert len(crashed) == 2, pids  # the third kept its process: it never received the request
    assert metric(end, "oss_poison_requests_total") - metric(start, "oss_poison_requests_total", 0) == 1


def test_a_replica_answering_busy_sends_its_requests_to_the_others(tmp_path_factory: pytest.TempPathFactory) -> None:
    env: dict[str, dict[str, Any]] = {r: {"ECHO_TOKEN_DELAY_S": "0.01"} for r in REPLICAS}
    env[REPLICAS[0]]["ECHO_BUSY"] = "1"
    with Dataflow(ROOT / "dataflow-replicas.yml", tmp_path_factory.mktemp("busy"), env=env) as busy_flow:

        async def run() -> tuple[list[Stream], dict[str, dict[str, Any]], str]:
            async with httpx.AsyncClient(base_url=busy_flow.base_url, timeout=60) as client:
                streams = await asyncio.gather(*(stream(client, Stream(words(4000 + i, 5))) for i in range(12)))
                return list(streams), await health_rows(client), (await client.get("/metrics")).text

        streams, rows, metrics = asyncio.run(run())
    broken = [(s.text, s.deltas, s.errors) for s in streams if not s.exact]
    assert broken == [], broken[:3]
    assert rows[REPLICAS[0]]["served"] == 0 and rows[REPLICAS[1]]["served"] + rows[REPLICAS[2]]["served"] >= 12
    assert metric(metrics, "oss_retries_total") >= 1  # some went to the busy one first, and on from there
