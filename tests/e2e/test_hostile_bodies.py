"""Large legal bodies against the real ``dora run dataflow-stream.yml``: ``/health`` stays responsive.

Six bodies of 200,000 one-word turns (~7 MB each, under the 8 MB limit) are posted at once
while ``/health`` is polled. Each is parsed, validated and turned into parts on the server's
worker thread (docs/architecture.md, "Admission"), so no poll waits more than a small share of
the time the posts take: ~4 % here (~0.2 s of ~5 s; the JSON decode and the collector's passes
over a parsed body hold the GIL that long). Prepared on the event loop, a poll waited behind one
body or several: 18-68 % of it (0.7 to 4 s). Every post is answered in full by the echo node.
"""

from __future__ import annotations

import json
import statistics
import threading
import time

import httpx
import pytest

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

BODIES = 6
WORDS = 200_000
SHARE = 8
"""A /health poll may wait at most 1/SHARE of the time the large posts take."""


def test_health_stays_responsive_while_large_legal_bodies_are_posted(fast_echo_flow: Dataflow) -> None:
    turns = [{"role": "user", "content": "w"}, {"role": "assistant", "content": "w"}] * (WORDS // 2)
    messages = [*turns, {"role": "user", "content": "the last question"}]
    body = json.dumps({"model": "m", "max_tokens": 8, "messages": messages}).encode()
    assert len(body) < 8 * 1024 * 1024
    answers: list[tuple[int, str]] = []

    def post() -> None:
        with httpx.Client(base_url=fast_echo_flow.base_url, timeout=240) as client:
            r = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
            answers.append((r.status_code, r.json()["choices"][0]["message"]["content"] if r.status_code == 200 else r.text))

    with httpx.Client(base_url=fast_echo_flow.base_url, timeout=240) as health:
        idle = [_timed(health) for _ in range(20)]
        posters = [threading.Thread(target=post) for _ in range(BODIES)]
        started = time.perf_counter()
        for poster in posters:
            poster.start()
        during = []
        while any(poster.is_alive() for poster in posters) and time.perf_counter() - started < 240:
            during.append(_timed(health))
            time.sleep(0.01)
        took = time.perf_counter() - started
        for poster in posters:
            poster.join(10)
    assert answers == [(200, "the last question")] * BODIES
    worst = max(during)
    print(
        f"\n/health idle median {statistics.median(idle) * 1000:.1f} ms; during {len(during)} polls: "
        f"median {statistics.median(during) * 1000:.1f} ms, max {worst * 1000:.0f} ms; the posts took {took:.2f} s"
    )
    assert worst < took / SHARE, f"a /health poll waited {worst:.2f} s of the {took:.2f} s the large posts took"


def _timed(client: httpx.Client) -> float:
    started = time.perf_counter()
    r = client.get("/health")
    assert r.status_code == 200
    return time.perf_counter() - started
