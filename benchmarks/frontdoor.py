"""The front door on more than one core: 1 vs N server processes on one port, in one run.

Each run starts the generator's dataflow (``openai-stream-server dataflow``, docs/architecture.md,
"Several server processes") with N servers sharing one port (``SO_REUSEPORT``) and one step-mode
``echo-stream`` replica (the batch form: one dora message per step per server), for each N in
``--servers``, and drives it with the harness's lean client (``scenarios.py``): one connection per
stream, so the kernel spreads the streams over the servers.

- **burst 64**: 64 streams streaming answers back to back, the echo stepping every 0.1 ms (as
  fast as it can): the server is the bottleneck; delivered tokens/s and SSE events/s;
- **paced 4,000 x 10**: 4,000 streams x 10 tokens/s (one step every 100 ms), added delay from the
  node's stamp to the client (``OPENAI_STREAM_SERVER_RELAY_SENT_AT``).

For each, the CPU of every server process (``/proc``) divided by the SSE events it wrote
(``oss_sse_events_total`` read from each server's ``/metrics``) is its CPU per event, the capacity
model's unit: one core carries 1 / that many events a second. The CPU of the echo node, of ``dora
run`` (the daemon) and of the client is reported beside it. The store is ``memory`` (``--store``
for another): this measures the front door, the store's own figures are ``benchmarks/store.py``'s.

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.frontdoor --servers 1,2 --runs 3
    benchmarks/frontdoor_many.sh            # 1, 2, 4, 8 servers, several client processes (a machine with cores)

Results: ``benchmarks/results/frontdoor.json`` and a Markdown table on stdout (benchmarks/README.md,
"Several server processes").
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.frontdoor import FrontDoorFlow
from tests.live import metric

from . import scenarios
from .procs import cpu_seconds
from .run import raise_open_files_limit, run_async

RESULTS = Path(__file__).resolve().parent / "results"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _client(job: tuple[str, int, dict[str, Any], int]) -> dict[str, Any]:
    """One client process's share of a scenario (``scenarios.burst`` or ``scenarios.paced``) and its own CPU."""
    kind, port, params, first_id = job
    ids: Iterator[int] = scenarios.stream_ids(first_id)
    started = time.process_time()
    if kind == "burst":
        result = run_async(scenarios.burst(port, params["concurrency"], params["tokens"], params["each"], ids, 180))
    else:
        result = run_async(scenarios.paced(port, params["streams"], params["tokens"], params["rate"], ids, 300))
    result["client_cpu_s"] = time.process_time() - started
    return result


def drive(kind: str, port: int, params: dict[str, Any], clients: int) -> dict[str, Any]:
    """The scenario from ``clients`` processes (each a share of the streams); their results merged."""
    if clients == 1:
        return _client((kind, port, params, 0))
    key = "concurrency" if kind == "burst" else "streams"
    shares = [params[key] // clients + (1 if i < params[key] % clients else 0) for i in range(clients)]
    jobs = [(kind, port, {**params, key: n}, i * 10_000_000) for i, n in enumerate(shares) if n]
    with multiprocessing.get_context("spawn").Pool(len(jobs)) as pool:
        parts = pool.map(_client, jobs)
    merged: dict[str, Any] = {
        "clients": len(parts),
        "wall_s": max(p["wall_s"] for p in parts),
        "tokens": sum(p["tokens"] for p in parts),
        "events": sum(p["events"] for p in parts),
        "client_cpu_s": sum(p["client_cpu_s"] for p in parts),
        "integrity": {
            "exact": all(p["integrity"]["exact"] for p in parts),
            "streams": sum(p["integrity"]["streams"] for p in parts),
        },
    }
    if kind == "burst":
        merged["tokens_per_s"] = round(merged["tokens"] / merged["wall_s"], 1)
        merged["events_per_s"] = round(merged["events"] / merged["wall_s"], 1)
    else:
        merged["offered_tokens_per_s"] = sum(p["offered_tokens_per_s"] for p in parts)
        merged["delivered_tokens_per_s"] = sum(p["delivered_tokens_per_s"] for p in parts)
        # Percentiles do not add up: the worst client's p99 bounds the whole.
        merged["added_delay_p50_ms"] = max(p["added_delay_p50_ms"] or 0 for p in parts)
        merged["added_delay_p99_ms"] = max(p["added_delay_p99_ms"] or 0 for p in parts)
        merged["events_per_s"] = round(merged["events"] / merged["wall_s"], 1)
    return merged


class Meter:
    """CPU of every server process, the echo node, ``dora run``, and SSE events per server, over one scenario."""

    def __init__(self, flow: FrontDoorFlow) -> None:
        self.flow = flow
        self.pids = {name: flow.node_pid(name) for name in [*flow.servers, *flow.replicas]}
        assert all(self.pids.values()), self.pids
        assert flow.process is not None
        self.pids["dora"] = flow.process.pid

    def read(self) -> tuple[dict[str, float], dict[str, float]]:
        cpu = {name: cpu_seconds(pid) for name, pid in self.pids.items() if pid}
        scraped = self.flow.scrape_each()
        events = {name: metric(text, "oss_sse_events_total", default=0.0) for name, text in scraped.items()}
        return cpu, events

    def __enter__(self) -> Meter:
        self.cpu0, self.events0 = self.read()
        return self

    def __exit__(self, *exc: object) -> None:
        cpu1, events1 = self.read()
        self.cpu = {k: cpu1[k] - self.cpu0[k] for k in cpu1}
        self.events = {k: events1[k] - self.events0.get(k, 0.0) for k in events1}

    def figures(self) -> dict[str, Any]:
        servers = self.flow.servers
        per_event = {s: self.cpu[s] / self.events[s] * 1e6 if self.events.get(s) else None for s in servers}
        return {
            "server_cpu_s": {s: round(self.cpu[s], 3) for s in servers},
            "server_events": {s: self.events.get(s, 0.0) for s in servers},
            "server_cpu_us_per_event": {s: None if v is None else round(v, 2) for s, v in per_event.items()},
            "echo_cpu_s": round(sum(self.cpu[r] for r in self.flow.replicas), 3),
            "dora_cpu_s": round(self.cpu["dora"], 3),
        }


def one(
    workdir: Path, servers: int, kind: str, params: dict[str, Any], echo_env: dict[str, Any], clients: int, store: str
) -> dict[str, Any]:
    server_env = {"OPENAI_STREAM_SERVER_RELAY_SENT_AT": 1} if kind == "paced" else {}
    node_env = {"ECHO_TOKEN_DELAY_S": 0, "ECHO_HEARTBEAT_S": 0.25, **echo_env}
    with FrontDoorFlow(workdir, store, servers=servers, replicas=1, node_env=node_env, server_env=server_env) as flow:
        run_async(scenarios.burst(flow.port, 8, 16, 2, scenarios.stream_ids(900_000_000), 60))  # warm up every server
        with Meter(flow) as meter:
            result = drive(kind, flow.port, params, clients)
        result.update(meter.figures(), servers=servers, scenario=kind)
    total_events = sum(result["server_events"].values())
    cpu = sum(result["server_cpu_s"].values())
    if kind == "paced":  # SSE events/s in the steady window: the delivered tokens/s at the run's events per token
        result["events_per_s"] = round(result["delivered_tokens_per_s"] * result["events"] / max(result["tokens"], 1), 1)
    result["server_cpu_us_per_chunk"] = round(cpu / result["tokens"] * 1e6, 2) if result["tokens"] else None
    result["server_cpu_us_per_event_all"] = round(cpu / total_events * 1e6, 2) if total_events else None
    result["events_per_core_s"] = round(total_events / cpu, 1) if cpu else None
    return result


@contextlib.contextmanager
def pinned_clients(flow: FrontDoorFlow, attempts: int = 200) -> Iterator[dict[str, httpx.Client]]:
    """One client per server whose one kept-alive connection reached it."""
    clients: dict[str, httpx.Client] = {}
    try:
        for _ in range(attempts):
            client = httpx.Client(base_url=flow.base_url, timeout=5, limits=httpx.Limits(max_connections=1))
            name = client.get("/health").json()["server"]["name"]
            if name in clients:
                client.close()
            else:
                clients[name] = client
            if len(clients) == len(flow.servers):
                break
        yield clients
    finally:
        for client in clients.values():
            client.close()


def balance(workdir: Path, heartbeats: bool, store: str, args: argparse.Namespace) -> dict[str, Any]:
    """2 servers x 3 replicas under the replica benchmark's load: how evenly the replicas are loaded.

    Each replica has ``--slots`` slots and a per-token delay (benchmarks/replicas.py's replica-bound shape), the load
    is more workers than all slots together. Every 0.1 s each server's ``/health`` (on a connection pinned to it) gives
    its requests in flight on each replica; their sum is the replica's load (generating and queued). With heartbeats
    off the servers route on their own requests only (``Replica.routing_load``).
    """
    node_env = {
        "ECHO_TOKEN_DELAY_S": args.delay_s,
        "ECHO_MAX_CONCURRENT": args.slots,
        "ECHO_HEARTBEAT_S": 0.25 if heartbeats else 0,
    }
    with FrontDoorFlow(workdir, store, servers=2, replicas=3, node_env=node_env) as flow:
        run_async(scenarios.burst(flow.port, 8, 4, 1, scenarios.stream_ids(800_000_000), 60))
        samples: list[dict[str, int]] = []
        stop = threading.Event()
        with pinned_clients(flow) as clients:

            def sample() -> None:
                while not stop.wait(0.1):
                    load = dict.fromkeys(flow.replicas, 0)
                    for client in clients.values():
                        for row in client.get("/health").json()["replicas"]:
                            load[row["id"]] += row["in_flight"]
                    samples.append(load)

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                result = run_async(
                    scenarios.burst(flow.port, args.concurrency, 20, args.streams_each, scenarios.stream_ids(), 180)
                )
            finally:
                stop.set()
                sampler.join(10)
        scraped = flow.scrape_each()
    served = {
        r: sum(metric(t, f'oss_replica_served_total{{replica="{r}"}}', default=0.0) for t in scraped.values())
        for r in flow.replicas
    }
    # The steady part: every worker's request in flight, or every slot busy.
    busy = [s for s in samples if sum(s.values()) >= min(args.slots * len(flow.replicas), args.concurrency)]
    ratios = [max(s.values()) / min(s.values()) if min(s.values()) else float("inf") for s in busy]
    spreads = [max(s.values()) - min(s.values()) for s in busy]
    return {
        "heartbeats": heartbeats,
        "samples": len(samples),
        "busy_samples": len(busy),
        "load_max_over_min_p50": round(statistics.median(ratios), 3) if ratios else None,
        "load_max_over_min_p90": round(sorted(ratios)[int(0.9 * (len(ratios) - 1))], 3) if ratios else None,
        "load_max_minus_min_p50": statistics.median(spreads) if spreads else None,
        "piled_share": round(sum(1 for s in busy if min(s.values()) == 0 < max(s.values()) - 1) / len(busy), 3) if busy else None,
        "mean_load": round(statistics.mean(sum(s.values()) for s in busy) / 3, 2) if busy else None,
        "served": served,
        "served_max_over_min": round(max(served.values()) / min(served.values()), 3) if min(served.values()) else None,
        "completions_per_s": round(result["streams"] / result["wall_s"], 2),
        "integrity": result["integrity"],
    }


async def _pinned_stream_loop(url: str, server: str, tokens: int, until: asyncio.Event | None, ids: Iterator[int]) -> int:
    """Streams of ``tokens`` tokens on one connection pinned to ``server``: one, or back to back until ``until``."""
    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    for _ in range(200):
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            if (await client.get("/health")).json()["server"]["name"] != server:
                continue
            done = 0
            while True:
                body = scenarios.body(next(ids), tokens, stream=True)
                async with client.stream("POST", scenarios.PATH, json=body) as r:
                    async for _line in r.aiter_lines():
                        pass
                done += 1
                if until is None or until.is_set():
                    return done
    raise RuntimeError(f"no connection reached {server}")


def skewed_balance(workdir: Path, heartbeats: bool, store: str, args: argparse.Namespace) -> dict[str, Any]:
    """Another server's work the first cannot see: server 2 holds two long streams (on two replicas), server 1 streams
    short answers on two connections meanwhile. Blind, server 1 spreads its own over all three replicas and now and then
    puts both beside the long ones, leaving the third idle; with the heartbeats' load it sees which replica is free."""
    node_env = {
        "ECHO_TOKEN_DELAY_S": args.delay_s,
        "ECHO_MAX_CONCURRENT": args.slots,
        "ECHO_HEARTBEAT_S": 0.25 if heartbeats else 0,
    }
    with FrontDoorFlow(workdir, store, servers=2, replicas=3, node_env=node_env) as flow:
        samples: list[dict[str, int]] = []
        stop = threading.Event()
        with pinned_clients(flow) as clients:

            def sample() -> None:
                while not stop.wait(0.1):
                    load = dict.fromkeys(flow.replicas, 0)
                    for client in clients.values():
                        for row in client.get("/health").json()["replicas"]:
                            load[row["id"]] += row["in_flight"]
                    samples.append(load)

            async def scenario() -> int:
                ids = scenarios.stream_ids()
                longs = [
                    asyncio.ensure_future(_pinned_stream_loop(flow.base_url, flow.servers[1], 400, None, ids)) for _ in range(2)
                ]
                await asyncio.sleep(1.0)  # both long ones placed (on two replicas) before the short ones start
                ended = asyncio.Event()
                shorts = [
                    asyncio.ensure_future(_pinned_stream_loop(flow.base_url, flow.servers[0], 10, ended, ids)) for _ in range(2)
                ]
                await asyncio.gather(*longs)
                ended.set()
                return sum(await asyncio.gather(*shorts))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            try:
                short_streams = run_async(scenario())
            finally:
                stop.set()
                sampler.join(10)
    # While both long streams and both short ones are in flight: four requests on three replicas.
    busy = [s for s in samples if sum(s.values()) == 4]
    piled = sum(1 for s in busy if min(s.values()) == 0)
    return {
        "heartbeats": heartbeats,
        "skewed": True,
        "busy_samples": len(busy),
        "idle_replica_share": round(piled / len(busy), 3) if busy else None,
        "short_streams": short_streams,
    }


def balance_table(results: list[dict[str, Any]]) -> str:
    rows = [
        "| 2 servers x 3 replicas (median of runs) | heartbeat load (sees every server) | own requests only (no heartbeats) |",
        "| :--- | ---: | ---: |",
    ]
    for label, key in (
        ("replica load max/min, p50 of samples", "load_max_over_min_p50"),
        ("replica load max/min, p90 of samples", "load_max_over_min_p90"),
        ("replica load max - min, p50 (requests)", "load_max_minus_min_p50"),
        ("samples with an idle replica while another holds 2+", "piled_share"),
        ("mean load per replica (requests)", "mean_load"),
        ("completions per replica max/min", "served_max_over_min"),
        ("completions/s", "completions_per_s"),
    ):
        cells = []
        for on in (True, False):
            values = [r[key] for r in results if r["heartbeats"] is on and r[key] is not None]
            cells.append(f"{statistics.median(values):g}" if values else "-")
        rows.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(rows)


SCENARIOS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    # name: (scenario parameters, echo env)
    "burst": ({"concurrency": 64, "tokens": 256, "each": 16}, {"ECHO_STEP_MS": 0.1, "ECHO_STAMP": 0}),
    "paced": ({"streams": 4000, "tokens": 100, "rate": 10.0}, {"ECHO_STEP_MS": 100, "ECHO_STAMP": 1}),
}


def table(results: list[dict[str, Any]], server_counts: list[int]) -> str:
    def med(rs: list[dict[str, Any]], get: Callable[[dict[str, Any]], float | None]) -> float | None:
        values = [v for r in rs if (v := get(r)) is not None]
        return round(statistics.median(values), 1) if values else None

    rows = [
        "| figure (median of runs) | " + " | ".join(f"{n} server{'s' if n > 1 else ''}" for n in server_counts) + " |",
        "| :--- |" + " ---: |" * len(server_counts),
    ]

    def row(label: str, kind: str, get: Callable[[dict[str, Any]], float | None]) -> None:
        cells = [med([r for r in results if r["scenario"] == kind and r["servers"] == n], get) for n in server_counts]
        rows.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:,}" for c in cells) + " |")

    row("burst 64: delivered tokens/s", "burst", lambda r: r["tokens_per_s"])
    row("burst 64: SSE events/s (all servers)", "burst", lambda r: r["events_per_s"])
    row("burst 64: server CPU per chunk, each process (us)", "burst", lambda r: r["server_cpu_us_per_chunk"])
    row("burst 64: server CPU per event, each process (us)", "burst", lambda r: r["server_cpu_us_per_event_all"])
    row("burst 64: server CPU s (all processes)", "burst", lambda r: sum(r["server_cpu_s"].values()))
    row(
        "paced 4,000 x 10: delivered / offered (%)",
        "paced",
        lambda r: 100 * r["delivered_tokens_per_s"] / r["offered_tokens_per_s"],
    )
    row("paced 4,000 x 10: SSE events/s", "paced", lambda r: r["events_per_s"])
    row("paced 4,000 x 10: server CPU per event, each process (us)", "paced", lambda r: r["server_cpu_us_per_event_all"])
    row("paced 4,000 x 10: added delay p50 (ms)", "paced", lambda r: r["added_delay_p50_ms"])
    row("paced 4,000 x 10: added delay p99 (ms)", "paced", lambda r: r["added_delay_p99_ms"])
    row("paced: events per core-second of server CPU", "paced", lambda r: r["events_per_core_s"])
    rows.append("| every stream exact | " + " | ".join(
        "yes" if all(r["integrity"]["exact"] for r in results if r["servers"] == n) else "NO" for n in server_counts
    ) + " |")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.frontdoor", description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="1,2", help="server process counts, comma-separated (default 1,2)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default="burst,paced", help="burst, paced or both")
    parser.add_argument("--clients", type=int, default=1, help="client processes (one client core: ~100k events/s)")
    parser.add_argument("--paced-streams", type=int, default=4000)
    parser.add_argument("--store", default="memory")
    parser.add_argument("--balance", action="store_true", help="measure the replicas' balance instead (2 x 3, heartbeats on/off)")
    parser.add_argument("--slots", type=int, default=4, help="--balance: ECHO_MAX_CONCURRENT per replica")
    parser.add_argument("--delay-s", type=float, default=0.02, help="--balance: ECHO_TOKEN_DELAY_S")
    parser.add_argument("--concurrency", type=int, default=32, help="--balance: workers")
    parser.add_argument("--streams-each", type=int, default=8, help="--balance: streams per worker")
    parser.add_argument("--skewed", action="store_true", help="--balance: another server's long streams (skewed_balance)")
    parser.add_argument("--json", type=Path, default=RESULTS / "frontdoor.json")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    if args.balance:
        balanced: list[dict[str, Any]] = []
        with tempfile.TemporaryDirectory(prefix="oss-balance-") as tmp:
            for run in range(args.runs):
                for heartbeats in (True, False):
                    measure = skewed_balance if args.skewed else balance
                    result = measure(Path(tmp) / f"{run}-{heartbeats}", heartbeats, args.store, args)
                    result["run"] = run
                    balanced.append(result)
                    log(f"run {run} heartbeats={heartbeats}: {json.dumps({k: v for k, v in result.items() if k != 'integrity'})}")
        path = args.json.with_name("frontdoor-balance.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(balanced, indent=1))
        if args.skewed:
            for on in (True, False):
                shares = [
                    r["idle_replica_share"] for r in balanced if r["heartbeats"] is on and r["idle_replica_share"] is not None
                ]
                print(
                    f"heartbeats {'on ' if on else 'off'}: a replica idle while 4 requests are in flight on the others, "
                    f"median share of samples {statistics.median(shares) if shares else '-'} (runs: {shares})"
                )
        else:
            print(balance_table(balanced))
        return 0 if all(r.get("integrity", {"exact": True})["exact"] for r in balanced) else 1
    counts = [int(n) for n in args.servers.split(",")]
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oss-frontdoor-") as tmp:
        for run in range(args.runs):
            for n in counts:  # interleaved: each run measures every server count in turn
                for kind in args.only.split(","):
                    params, echo_env = SCENARIOS[kind]
                    if kind == "paced":
                        params = {**params, "streams": args.paced_streams}
                    result = one(Path(tmp) / f"{run}-{n}-{kind}", n, kind, params, echo_env, args.clients, args.store)
                    result["run"] = run
                    results.append(result)
                    log(
                        f"run {run} servers={n} {kind}: {result['events_per_s']:,.0f} events/s, "
                        f"{result['server_cpu_us_per_event_all']} us/event, events by server {result['server_events']}, "
                        f"p99 {result.get('added_delay_p99_ms')} ms, exact={result['integrity']['exact']}"
                    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print(table(results, counts))
    return 0 if all(r["integrity"]["exact"] for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
