"""Priority tiers under overload: time to first chunk per tier, and what is shed, with and without the server's queue.

In one process: the app driven over ASGI directly (each stream's first content chunk is timed as the app sends
it; no network), in front of a fake replica that generates ``--capacity`` requests at once and queues the rest in
arrival order, as echo-stream does with ``ECHO_MAX_CONCURRENT`` (and says so in its hello: ``capacity``).
Requests arrive as a Poisson process at ``--load`` times what the replica can serve, ``--priority`` of them with
``service_tier: priority``, the rest ``default``. Two runs on the same arrivals:

- ``node-queue``: no ``--max-queued`` (the server as it was): everything goes downstream and waits in the replica;
- ``server-queue``: ``--max-queued N``: beyond capacity requests wait in the server in tier order; a newcomer to a
  full queue sheds the newest ``default`` waiter if it is ``priority``, else gets 429 (``shed_429`` counts both).

    .venv/bin/python -m benchmarks.tiers --duration 4 --capacity 4 --load 2 --max-queued 16
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

from openai_stream_server.app import create_app
from openai_stream_server.backend import DownstreamRequest
from openai_stream_server.replicas import Replica
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend


@dataclass
class SlotReplica(FakeBackend):
    """The fake echo generating ``capacity`` requests at once, the rest waiting in arrival order (in the replica)."""

    capacity: int = 4
    slots: asyncio.Semaphore | None = None
    replica: Replica = field(init=False)

    def __post_init__(self) -> None:
        self.replica = Replica("echo", "v1/chat/completions/echo", None, frozenset(), frozenset(), capacity=self.capacity)

    def replica_stats(self) -> list[Replica]:
        return [self.replica]

    async def _answer(self, request: DownstreamRequest) -> None:
        if self.slots is None:
            self.slots = asyncio.Semaphore(self.capacity)
        async with self.slots:
            await super()._answer(request)


@dataclass
class Outcome:
    tier: str
    status: int = 0
    ttfc_s: float | None = None


async def one(app: Any, tier: str, words: int) -> Outcome:
    """One streamed chat request over ASGI; the time until its first content chunk leaves the app."""
    body = json.dumps(
        {"model": "m", "stream": True, "service_tier": tier, "messages": [{"role": "user", "content": "w " * words}]}
    ).encode()
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(b"host", b"localhost"), (b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
    }  # fmt: skip
    outcome = Outcome(tier)
    started = time.perf_counter()
    sent = False
    finished = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        await finished.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            outcome.status = message["status"]
        elif message["type"] == "http.response.body":
            if outcome.ttfc_s is None and b'{"content":' in message.get("body", b""):  # not the role chunk's
                outcome.ttfc_s = time.perf_counter() - started
            elif b'"rate_limit_exceeded"' in message.get("body", b""):  # shed after its headers went out
                outcome.status = 429
            if not message.get("more_body"):
                finished.set()

    await app(scope, receive, send)
    finished.set()
    return outcome


async def run(args: argparse.Namespace, max_queued: tuple[str, ...], arrivals: list[tuple[float, str]]) -> list[Outcome]:
    backend = SlotReplica(delay_s=args.token_delay_s, capacity=args.capacity)
    app = create_app(Settings(max_queued=max_queued, log_level="warning"), backend)
    async with app.router.lifespan_context(app):
        start = time.perf_counter()
        tasks = []
        for at, tier in arrivals:
            wait = start + at - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            tasks.append(asyncio.ensure_future(one(app, tier, args.words)))
        return list(await asyncio.gather(*tasks))


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def summary(outcomes: list[Outcome]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tier in ("priority", "default"):
        mine = [o for o in outcomes if o.tier == tier]
        ttfc = [o.ttfc_s for o in mine if o.status == 200 and o.ttfc_s is not None]
        out[tier] = {
            "requests": len(mine),
            "shed_429": sum(o.status == 429 for o in mine),
            "ttfc_p50_ms": round(1000 * statistics.median(ttfc), 1) if ttfc else None,
            "ttfc_p99_ms": round(1000 * p, 1) if (p := percentile(ttfc, 0.99)) is not None else None,
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=4.0, help="seconds of arrivals")
    parser.add_argument("--capacity", type=int, default=4, help="requests the replica generates at once")
    parser.add_argument("--words", type=int, default=10, help="tokens per answer")
    parser.add_argument("--token-delay-s", type=float, default=0.01)
    parser.add_argument("--load", type=float, default=2.0, help="offered load / capacity")
    parser.add_argument("--priority", type=float, default=0.2, help="share of priority requests")
    parser.add_argument("--max-queued", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    service_s = args.words * args.token_delay_s
    rate = args.load * args.capacity / service_s
    rng = random.Random(args.seed)
    arrivals: list[tuple[float, str]] = []
    at = rng.expovariate(rate)
    while at < args.duration:
        arrivals.append((at, "priority" if rng.random() < args.priority else "default"))
        at += rng.expovariate(rate)
    report = {
        "offered_per_s": round(rate, 1),
        "capacity_per_s": round(args.capacity / service_s, 1),
        "requests": len(arrivals),
        "node-queue": summary(asyncio.run(run(args, (), arrivals))),
        "server-queue": summary(asyncio.run(run(args, (str(args.max_queued),), arrivals))),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
