"""Replica scale-out: completions/s and chunks/s with 1, 2 and 4 echo replicas, and a restart's recovery time.

Each replica is echo_stream with ``ECHO_MAX_CONCURRENT`` slots and a per-token delay, so one replica
is the bottleneck (K slots x tokens x delay per request); the server and dora have room to spare. The
load is the harness's burst (``scenarios.burst``): more workers than all replicas' slots together,
each streaming answers back to back, every answer checked word by word. The ratios are taken inside
one run. Then, on a 2-replica flow under ``restart_policy: on-failure``, one replica is SIGKILLed and
the time from the kill to its hello (live again in ``/health``) and to its first served request is read.

``--failover`` measures failover without a break instead (docs/architecture.md, "Failover"): three
replicas, 1, 10 or 100 streams mid-answer on one of them, which is SIGKILLed (dora restarts it) or
SIGSTOPped (its heartbeats stop; ``--replica-silence-s`` later it counts as dead); for each of its
streams, the time from the signal to the stream's next chunk, which another replica sends after the
pieces already delivered. Its streams are the ones the server's log names as continued. Then the CPU
the heartbeats cost: the server's and the replicas' CPU over an idle spell and over a spell holding one
slow request per replica, with heartbeats on (``ECHO_HEARTBEAT_S`` 0.25) and off (0).

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.replicas --runs 3
    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.replicas --failover --runs 3

Results: ``benchmarks/results/replicas.json`` and a Markdown table on stdout (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import re
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.dataflow import ROOT

from .client import Connection, Integrity, Response
from .flows import BenchFlow
from .procs import CpuMeter
from .scenarios import PATH, _stream_failure, body, burst, percentile, stream_ids

YML = ROOT / "dataflow-replicas.yml"
RESULTS = Path(__file__).resolve().parent / "results"


def with_replicas(n: int, env: dict[str, str]) -> Any:
    """A transform for ``Dataflow``: dataflow-replicas.yml's server with ``n`` copies of its first replica."""

    def transform(spec: dict[str, Any]) -> dict[str, Any]:
        server = next(node for node in spec["nodes"] if node["id"] == "openai-stream-server")
        template = next(node for node in spec["nodes"] if node["id"] == "echo-stream-1")
        ids = [f"echo-stream-{i}" for i in range(1, n + 1)]
        queue = {"queue_size": 100000, "queue_policy": "backpressure"}
        server["inputs"] = {**{f"chunks/{r}": {"source": f"{r}/chunks", **queue} for r in ids}, "tick": "dora/timer/millis/500"}
        server["outputs"] = [o for r in ids for o in (f"v1/chat/completions/{r}", f"cancel/{r}")]
        replicas = []
        for r in ids:
            node = copy.deepcopy(template)
            node["id"] = r
            node["inputs"] = {
                "v1/chat/completions": {"source": f"openai-stream-server/v1/chat/completions/{r}", **queue},
                "cancel": {"source": f"openai-stream-server/cancel/{r}", **queue},
            }
            node["env"] = {**(node.get("env") or {}), **env}
            replicas.append(node)
        spec["nodes"] = [server, *replicas]
        return spec

    return transform


def health(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:  # noqa: S310 (127.0.0.1)
        return json.loads(response.read())  # type: ignore[no-any-return]


def node_pid(flow: BenchFlow, node_id: str) -> int | None:
    for pid in flow.node_pids():
        try:
            if f"node_id: {node_id}\n".encode() in Path(f"/proc/{pid}/environ").read_bytes():
                return pid
        except OSError:
            continue
    return None


def scale_point(n: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    env = {"ECHO_TOKEN_DELAY_S": str(args.delay_s), "ECHO_MAX_CONCURRENT": str(args.slots)}
    with BenchFlow(YML, workdir / f"n{n}", transform=with_replicas(n, env)) as flow:
        server = CpuMeter(flow.node_pid("openai-stream-server"))
        ids = stream_ids(n * 1_000_000)
        asyncio.run(burst(flow.port, args.concurrency, 4, 1, ids, 60))  # warm-up: connections, imports
        server.start()
        result = asyncio.run(burst(flow.port, args.concurrency, args.tokens, args.streams_each, ids, 120))
        result["server_cpu_s"] = round(server.stop(), 3)
        result["served"] = {r["id"]: r["served"] for r in health(flow.port)["replicas"]}
    result["replicas"] = n
    result["completions_per_s"] = round(result["streams"] / result["wall_s"], 2)
    return result


def restart_point(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """SIGKILL one of two replicas at rest; read how long until it is live again and until it serves."""
    env = {"ECHO_TOKEN_DELAY_S": str(args.delay_s), "ECHO_MAX_CONCURRENT": str(args.slots)}
    with BenchFlow(YML, workdir / "restart", transform=with_replicas(2, env)) as flow:
        victim = "echo-stream-2"
        ids = stream_ids(9_000_000)
        asyncio.run(burst(flow.port, 4, 4, 1, ids, 60))
        served_before = {r["id"]: r["served"] for r in health(flow.port)["replicas"]}[victim]
        pid = node_pid(flow, victim)
        assert pid is not None
        killed = time.perf_counter()
        os.kill(pid, signal.SIGKILL)
        live_at = served_at = None
        deadline = killed + 30
        while time.perf_counter() < deadline and served_at is None:
            asyncio.run(burst(flow.port, 2, 2, 1, ids, 30))  # a trickle of requests: least-in-flight picks it when live
            rows = {r["id"]: r for r in health(flow.port)["replicas"]}
            if live_at is None and rows[victim]["live"] and rows[victim]["failures"] >= 1:
                live_at = time.perf_counter()
            if rows[victim]["served"] > served_before and rows[victim]["failures"] >= 1:
                served_at = time.perf_counter()
    return {
        "kill_to_live_s": None if live_at is None else round(live_at - killed, 3),
        "kill_to_first_served_s": None if served_at is None else round(served_at - killed, 3),
    }


FAILOVER_REPLICAS = 3
VICTIM = "echo-stream-2"
_CONTINUED = re.compile(r"completion (\S+): attempt \d+, continuing after")


def failover_point(how: str, on_victim: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """``on_victim`` streams mid-answer on one of three replicas, which gets ``how`` (SIGKILL or SIGSTOP); for each of
    them, the seconds from the signal to its next chunk."""
    replica_env = {"ECHO_TOKEN_DELAY_S": str(args.failover_delay_s)}
    server_env = {"OPENAI_STREAM_SERVER_REPLICA_SILENCE_S": str(args.silence_s)}
    with BenchFlow(
        YML,
        workdir / f"{how.lower()}{on_victim}",
        transform=with_replicas(FAILOVER_REPLICAS, replica_env),
        env={"openai-stream-server": server_env},
    ) as flow:
        pid = node_pid(flow, VICTIM)
        assert pid is not None
        responses, at = asyncio.run(_streams_through(flow.port, pid, getattr(signal, how), on_victim, args))
        if how == "SIGSTOP":
            os.kill(pid, signal.SIGCONT)
        continued = _continued_ids(flow.workdir)
    integrity = Integrity()
    for stream_id, response in responses.items():
        integrity.add(stream_id, args.failover_tokens, response.content, failed=_stream_failure(response))
    gaps = []
    for response in responses.values():
        if response.headers.get(b"x-request-id", b"").decode() in continued:
            after = [t for t in response.arrivals if t > at]
            if after:
                gaps.append(after[0] - at)
    return {
        "signal": how,
        "on_victim": on_victim,
        "streams": len(responses),
        "continued": len(gaps),
        "next_chunk_p50_s": _round(percentile(gaps, 50)),
        "next_chunk_p99_s": _round(percentile(gaps, 99)),
        "integrity": integrity.as_dict(),
    }


async def _streams_through(
    port: int, pid: int, signum: int, on_victim: int, args: argparse.Namespace
) -> tuple[dict[int, Response], float]:
    """Start ``on_victim`` streams per replica at once (least in flight, ties round robin: as many on each), signal the
    victim once every stream has had a chunk, and return every response and when the signal went."""
    ids = stream_ids(7_000_000 + 1000 * on_victim)
    connections = {next(ids): Connection(port) for _ in range(FAILOVER_REPLICAS * on_victim)}
    tasks = {
        stream_id: asyncio.ensure_future(
            connection.post(PATH, body(stream_id, args.failover_tokens, stream=True), stream=True, timeout_s=180)
        )
        for stream_id, connection in connections.items()
    }
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        protocols = [c._protocol for c in connections.values()]
        if all(p is not None and p.response is not None and p.response.arrivals for p in protocols):
            break
        await asyncio.sleep(0.02)
    at = time.time()  # the client stamps arrivals with time.time()
    os.kill(pid, signum)
    responses = dict(zip(tasks, await asyncio.gather(*tasks.values()), strict=True))
    for connection in connections.values():
        connection.close()
    return responses, at


def _continued_ids(workdir: Path) -> set[str]:
    """The completions the server's log names as continued on another replica."""
    found: set[str] = set()
    for log in workdir.glob("out/*/log_openai-stream-server.jsonl"):
        found.update(_CONTINUED.findall(log.read_text(errors="replace")))
    return found


def heartbeat_cpu_point(heartbeat_s: float, holding: bool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """CPU seconds of the server and the replicas over ``args.cpu_window_s``: idle, or each replica holding one slow
    request (a token every 5 s: the chunks cost next to nothing, the heartbeats are what runs)."""
    env = {"ECHO_TOKEN_DELAY_S": "5", "ECHO_HEARTBEAT_S": str(heartbeat_s)}
    name = f"hb{heartbeat_s:g}-{'holding' if holding else 'idle'}"
    with BenchFlow(YML, workdir / name, transform=with_replicas(FAILOVER_REPLICAS, env)) as flow:
        meters = [CpuMeter(pid) for pid in flow.node_pids()]

        async def hold() -> None:
            connections = [Connection(flow.port) for _ in range(FAILOVER_REPLICAS)]
            tasks = [
                asyncio.ensure_future(c.post(PATH, body(8_000_000 + i, 100, stream=True), stream=True, timeout_s=600))
                for i, c in enumerate(connections)
            ]
            await asyncio.sleep(1.0)  # every replica holds its request
            for meter in meters:
                meter.start()
            await asyncio.sleep(args.cpu_window_s)
            for meter in meters:
                meter.stop()
            for task in tasks:
                task.cancel()
            for c in connections:
                c.close()

        if holding:
            asyncio.run(hold())
        else:
            time.sleep(1.0)
            for meter in meters:
                meter.start()
            time.sleep(args.cpu_window_s)
            for meter in meters:
                meter.stop()
    used = sum(m.used for m in meters)
    percent = round(100 * used / args.cpu_window_s, 2)
    return {"heartbeat_s": heartbeat_s, "holding": holding, "cpu_s": round(used, 3), "cpu_percent": percent}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def failover_main(args: argparse.Namespace) -> None:
    sizes = [int(n) for n in args.on_victim.split(",")]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oss-bench-failover-") as tmp:
        for run in range(args.runs):
            workdir = Path(tmp) / f"run{run}"
            points = [failover_point(how, n, args, workdir) for how in ("SIGKILL", "SIGSTOP") for n in sizes]
            cpu = [heartbeat_cpu_point(hb, holding, args, workdir) for holding in (False, True) for hb in (0.25, 0.0)]
            runs.append({"failover": points, "heartbeat_cpu": cpu})
            print(json.dumps({"run": run, "failover": [(p["signal"], p["on_victim"], p["next_chunk_p50_s"]) for p in points]}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))
    print(failover_table(runs, sizes, args))
    exact = all(p["integrity"]["exact"] for r in runs for p in r["failover"])
    raise SystemExit(0 if exact else 1)


def failover_table(runs: list[dict[str, Any]], sizes: list[int], args: argparse.Namespace) -> str:
    lines = [
        f"Failover: 3 echo replicas, ECHO_TOKEN_DELAY_S={args.failover_delay_s}, {args.failover_tokens}-token answers, "
        f"--replica-silence-s {args.silence_s:g}; medians of {len(runs)} runs.",
        "",
        "| signal | streams on it | continued | next chunk p50 s | next chunk p99 s | every stream exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for how in ("SIGKILL", "SIGSTOP"):
        for n in sizes:
            points = [p for r in runs for p in r["failover"] if p["signal"] == how and p["on_victim"] == n]
            lines.append(
                f"| {how} | {n} | {_median([p['continued'] for p in points])} | "
                f"{_median([p['next_chunk_p50_s'] for p in points])} | {_median([p['next_chunk_p99_s'] for p in points])} | "
                f"{all(p['integrity']['exact'] for p in points)} |"
            )
    lines += [
        "",
        f"Heartbeat CPU (server + 3 replicas, {args.cpu_window_s:g} s windows, % of one core):",
        "",
        "| | heartbeats every 0.25 s | no heartbeats |",
        "| --- | --- | --- |",
    ]
    for holding in (False, True):
        cells = []
        for hb in (0.25, 0.0):
            points = [p for r in runs for p in r["heartbeat_cpu"] if p["heartbeat_s"] == hb and p["holding"] == holding]
            cells.append(f"{_median([p['cpu_percent'] for p in points])} %")
        label = "each replica holding one slow request" if holding else "idle"
        lines.append(f"| {label} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--slots", type=int, default=4, help="ECHO_MAX_CONCURRENT per replica")
    parser.add_argument("--delay-s", type=float, default=0.02, help="ECHO_TOKEN_DELAY_S")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, default=32, help="workers streaming back to back")
    parser.add_argument("--streams-each", type=int, default=4)
    parser.add_argument("--json", type=Path, default=None, help="default: results/replicas.json (failover.json)")
    parser.add_argument("--failover", action="store_true", help="measure failover and heartbeat CPU instead")
    parser.add_argument("--on-victim", default="1,10,100", help="streams mid-answer on the replica that fails")
    parser.add_argument("--failover-delay-s", type=float, default=0.05, help="ECHO_TOKEN_DELAY_S for --failover")
    parser.add_argument("--failover-tokens", type=int, default=120, help="tokens per answer for --failover")
    parser.add_argument("--silence-s", type=float, default=1.0, help="--replica-silence-s for --failover")
    parser.add_argument("--cpu-window-s", type=float, default=20.0, help="CPU measuring window for --failover")
    args = parser.parse_args()
    if args.failover:
        args.json = args.json or RESULTS / "failover.json"
        failover_main(args)
        return
    args.json = args.json or RESULTS / "replicas.json"
    levels = [int(n) for n in args.replicas.split(",")]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oss-bench-replicas-") as tmp:
        for run in range(args.runs):
            points = {n: scale_point(n, args, Path(tmp) / f"run{run}") for n in levels}
            base = points[levels[0]]
            for point in points.values():
                point["speedup"] = round(point["completions_per_s"] / base["completions_per_s"], 3)
            restart = restart_point(args, Path(tmp) / f"run{run}")
            runs.append({"points": {str(n): p for n, p in points.items()}, "restart": restart})
            print(json.dumps({"run": run, **{n: (p["completions_per_s"], p["speedup"]) for n, p in points.items()}, **restart}))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "runs": runs}, indent=2))
    print(table(runs, levels, args))
    exact = all(p["integrity"]["exact"] for r in runs for p in r["points"].values())
    raise SystemExit(0 if exact else 1)


def _median(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 3) if present else None


def table(runs: list[dict[str, Any]], levels: list[int], args: argparse.Namespace) -> str:
    capacity = args.slots / (args.tokens * args.delay_s)
    lines = [
        f"Replicas: echo_stream, ECHO_MAX_CONCURRENT={args.slots}, ECHO_TOKEN_DELAY_S={args.delay_s}, "
        f"{args.tokens}-token answers, {args.concurrency} workers x {args.streams_each} streams; "
        f"one replica's capacity {capacity:g} completions/s. Medians of {len(runs)} runs.",
        "",
        "| replicas | completions/s | chunks/s | speedup (same run) | server CPU s | exact |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for n in levels:
        points = [r["points"][str(n)] for r in runs]
        lines.append(
            f"| {n} | {_median([p['completions_per_s'] for p in points])} | {_median([p['tokens_per_s'] for p in points])} | "
            f"{_median([p['speedup'] for p in points])}x | {_median([p['server_cpu_s'] for p in points])} | "
            f"{all(p['integrity']['exact'] for p in points)} |"
        )
    restarts = [r["restart"] for r in runs]
    lines += [
        "",
        f"Restart (2 replicas, one SIGKILLed at rest): kill to live again {_median([r['kill_to_live_s'] for r in restarts])} s, "
        f"kill to first served request {_median([r['kill_to_first_served_s'] for r in restarts])} s (medians).",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
