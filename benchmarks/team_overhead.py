"""What the team features cost the server: CPU per request of the key check, the per-key limits and the model lookup.

In one process and one run, the same non-streaming chat requests through the app in-process
(``httpx.ASGITransport``, the fake echo backend, no network), alternating rounds:

- ``before``: no key file, no model groups (the server as it was);
- ``after``: ``--api-keys-file`` with 50 keys (the request's key with requests/min, tokens/min and
  concurrency limits, so every check and header runs), an alias, three replicas naming two models and
  saying their capacity, and ``--max-queued`` (every request takes and gives back a slot of its group's
  admission queue; the capacity is large, so none waits).

CPU is ``time.process_time()`` over each round (this process runs both the client and the app, so the
figure is the whole request path, the client's parsing of the extra headers included); the overhead is
(after - before) / before. On a shared machine rounds vary by several percent, so the same run also
times the checks alone (``checks_us``): the key gate around an app that only answers 200, less that
app alone, plus one model lookup and one admission (enter and release), as a share of ``before_us``.

    .venv/bin/python -m benchmarks.team_overhead --requests 2000 --rounds 5
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from openai_stream_server.app import create_app
from openai_stream_server.gateway.keys import hash_key
from openai_stream_server.replicas import Replica
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend


def _replicas() -> list[Replica]:
    out = []
    for name, model in (("a", "echo"), ("b", "echo"), ("c", "slow-echo")):
        r = Replica(name, f"v1/chat/completions/{name}", None, frozenset({f"{name}/chunks"}), frozenset({name}))
        r.models = (model,)
        r.capacity = 1_000_000  # said in its hello: the admission queue runs, and nothing waits
        out.append(r)
    return out


class _Grouped(FakeBackend):
    """The fake echo with three replicas that named two models (the bridge keeps its list; so does this)."""

    def __init__(self) -> None:
        super().__init__()
        self.groups = _replicas()

    def replica_stats(self) -> list[Replica]:
        return self.groups


async def _round(settings: Settings, backend: FakeBackend, headers: dict[str, str], n: int) -> float:
    app = create_app(settings, backend)
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "one two three four"}]}
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=30) as client:
            for _ in range(20):  # warm up
                (await client.post("/v1/chat/completions", json=body, headers=headers)).raise_for_status()
            start = time.process_time()
            for _ in range(n):
                (await client.post("/v1/chat/completions", json=body, headers=headers)).raise_for_status()
            return (time.process_time() - start) / n


async def main(requests: int, rounds: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        keys = Path(tmp) / "keys.json"
        entries = [{"name": f"user{i}", "key_sha256": hash_key(f"sk-{i}")} for i in range(49)]
        limits = {"requests_per_minute": 10**9, "tokens_per_minute": 10**12, "max_concurrent": 1000}
        entries.append({"name": "bench", "key_sha256": hash_key("sk-bench"), **limits})
        keys.write_text(json.dumps({"keys": entries}))
        before_s = Settings(sweep_interval_s=1.0)
        after_s = Settings(sweep_interval_s=1.0, api_keys_file=str(keys), model_alias=("gpt-4o=echo",), max_queued=("64",))
        before, after = [], []
        for i in range(rounds):  # alternating which goes first, so that neither always runs on a warmer heap
            for kind in ("before", "after") if i % 2 == 0 else ("after", "before"):
                if kind == "before":
                    before.append(await _round(before_s, FakeBackend(), {"Authorization": "Bearer sk-bench"}, requests))
                else:
                    after.append(await _round(after_s, _Grouped(), {"Authorization": "Bearer sk-bench"}, requests))
        checks = await _checks(after_s, requests * 10)
    b, a = statistics.median(before), statistics.median(after)
    return {
        "before_us": b * 1e6,
        "after_us": a * 1e6,
        "overhead_pct": (a - b) / b * 100,
        "checks_us": checks * 1e6,
        "checks_pct": checks / b * 100,
    }


async def _checks(settings: Settings, n: int) -> float:
    """CPU per request of the key gate (key, limits, headers, ownership context), the model lookup and the admission
    queue (a slot taken and given back) alone."""
    from openai_stream_server.gateway.keygate import KeyGate
    from openai_stream_server.gateway.keys import KeyRing
    from openai_stream_server.gateway.models import ModelCatalog
    from openai_stream_server.gateway.queue import AdmissionQueues, effective_tier, parse_tier
    from openai_stream_server.metrics import Metrics

    async def answer(scope: object, receive: object, send: object) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": b"{}"})  # type: ignore[operator]

    async def receive() -> dict[str, object]:
        return {"type": "http.request", "body": b""}

    async def send(message: object) -> None:
        return None

    assert settings.api_keys_file is not None
    gate = KeyGate(answer, ring=KeyRing(settings.api_keys_file), metrics=Metrics())
    catalog = ModelCatalog(settings, _Grouped().replica_stats)
    queues = AdmissionQueues(settings.max_queued, catalog.groups, _Grouped().replica_stats)
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"host", b"localhost"), (b"authorization", b"Bearer sk-bench"), (b"content-type", b"application/json")],
    }

    async def timed(app: object, lookup: bool) -> float:
        start = time.process_time()
        for _ in range(n):
            await app(dict(scope), receive, send)  # type: ignore[operator]
            if lookup:
                queues.enter(catalog.resolve("gpt-4o"), effective_tier(parse_tier(None), None, None)).release()
        return (time.process_time() - start) / n

    bare = min([await timed(answer, False) for _ in range(3)])
    gated = min([await timed(gate, True) for _ in range(3)])
    return gated - bare


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    gc.freeze()  # as the server's main() does: without it, collections land on whichever round allocated more
    gc.set_threshold(20_000, 50, 100)
    result = asyncio.run(main(args.requests, args.rounds))
    print(json.dumps({k: round(v, 2) for k, v in result.items()}))
