"""Soak: thousands of short streams with random disconnects against the real dataflow.

Bounded (a fixed number of requests, about a minute here, under a hard
timeout); marked ``slow`` but it runs in CI. Afterwards nothing is in flight,
every request left exactly one completion (metrics and the one INFO log line
each), and the server's resident memory is within a small margin of its level
after warm-up. Warm-up is longer than ``max_retained`` (1024) completions, so
the retention buffer is already full when the baseline is taken.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.dataflow import ROOT, Dataflow
from tests.live import Events, metric, wait_metric

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(420)]

WARMUP = 2000
MEASURED = 10_000
WORKERS = 16
MARGIN_BYTES = 16 * 1024 * 1024
"""Allowed growth of the server's RSS after warm-up: allocator noise, not one leaked byte per request.

A leak of 2 KiB per request would add 20 MiB over the measured requests; 16 MiB is about 13 % of
the server's resident size after warm-up here (~124 MiB: Python, pyarrow, dora, uvicorn).
"""


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for {pid}")


async def soak(client: httpx.AsyncClient, count: int, rng: random.Random, outcomes: Counter[str]) -> None:
    """``count`` requests from ``WORKERS`` concurrent workers, a random mix of whole and abandoned ones."""
    remaining = count

    async def one(i: int) -> None:
        words = [f"q{i}w{j}" for j in range(rng.randint(3, 20))]
        prompt = " ".join(words)
        kind = rng.choices(["stream", "drop", "json", "json-drop"], weights=[55, 30, 10, 5])[0]
        body = {"model": "m", "messages": [{"role": "user", "content": prompt}], "stream": kind in ("stream", "drop")}
        if kind == "stream":
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                data = await Events(r).take(100_000)
            assert data[-1] == "[DONE]", data[-3:]
            text = "".join(json.loads(d)["choices"][0]["delta"].get("content", "") for d in data[:-1])
            assert text == prompt
        elif kind == "drop":  # read a few events, then hang up
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                await Events(r).take(rng.randint(1, 3))
        elif kind == "json":
            r = await client.post("/v1/chat/completions", json=body)
            assert r.json()["choices"][0]["message"]["content"] == prompt
        else:  # give up before the answer
            try:
                await client.post("/v1/chat/completions", json=body, timeout=rng.uniform(0.001, 0.05))
            except httpx.TimeoutException:
                pass
        outcomes[kind] += 1

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await one(remaining)

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


def test_soak_with_random_disconnects_leaks_nothing(tmp_path: Path) -> None:
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.002"}}
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path, env=env) as flow:
        pid = flow.server_pid()
        assert pid is not None, flow.node_pids()
        rng = random.Random(1234)
        outcomes: Counter[str] = Counter()

        async def run() -> tuple[int, int, float, str]:
            limits = httpx.Limits(max_connections=WORKERS * 2, max_keepalive_connections=WORKERS)
            async with httpx.AsyncClient(base_url=flow.base_url, timeout=30, limits=limits) as client:
                started = time.monotonic()
                await asyncio.wait_for(soak(client, WARMUP, rng, outcomes), 180)
                assert await wait_metric(client, "oss_active_streams", 0, timeout_s=10) == 0
                baseline = rss_bytes(pid)
                await asyncio.wait_for(soak(client, MEASURED, rng, outcomes), 240)
                assert await wait_metric(client, "oss_active_streams", 0, timeout_s=10) == 0
                await asyncio.sleep(1.0)  # let the sweeper and the allocator settle
                final = rss_bytes(pid)
                return baseline, final, time.monotonic() - started, (await client.get("/metrics")).text

        baseline, final, elapsed, metrics = asyncio.run(run())
        health = httpx.get(flow.base_url + "/health", timeout=5).json()
        time.sleep(0.5)
        log = flow.log_path.read_text(errors="replace")
    total = WARMUP + MEASURED
    mib = 1024 * 1024
    cancelled = metric(metrics, 'oss_completions_total{status="cancelled",surface="chat"}', 0)
    print(
        f"soak: {total} requests in {elapsed:.1f} s {dict(outcomes)}; "
        f"server RSS {baseline / mib:.1f} MiB after warm-up, {final / mib:.1f} MiB at the end; "
        f"cancelled {cancelled:.0f}"
    )
    assert sum(outcomes.values()) == total
    assert health["active_streams"] == 0
    assert final - baseline < MARGIN_BYTES, f"RSS grew {(final - baseline) / mib:.1f} MiB"
    # every request ended exactly once: completed, or cancelled because its client left (a client that
    # gave up within milliseconds may have left before its request was read: no completion then)
    ended = metric(metrics, "oss_completions_total")
    assert total - outcomes["json-drop"] <= ended <= total, metrics
    assert metric(metrics, 'oss_completions_total{status="failed",surface="chat"}', 0) == 0
    assert cancelled >= outcomes["drop"] // 4
    # and logged exactly once at INFO
    ids = re.findall(r"INFO openai_stream_server\.registry: completion (chatcmpl-\w+) ", log)
    assert len(ids) == ended and len(set(ids)) == ended
