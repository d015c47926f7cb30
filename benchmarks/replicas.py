"""Replica scale-out: completions/s and chunks/s with 1, 2 and 4 echo replicas, and a restart's recovery time.

Each replica is echo_stream with ``ECHO_MAX_CONCURRENT`` slots and a per-token delay, so one replica
is the bottleneck (K slots x tokens x delay per request); the server and dora have room to spare. The
load is the harness's burst (``scenarios.burst``): more workers than all replicas' slots together,
each streaming answers back to back, every answer checked word by word. The ratios are taken inside
one run. Then, on a 2-replica flow under ``restart_policy: on-failure``, one replica is SIGKILLed and
the time from the kill to its hello (live again in ``/health``) and to its first served request is read.

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.replicas --runs 3

Results: ``benchmarks/results/replicas.json`` and a Markdown table on stdout (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import os
import signal
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from tests.dataflow import ROOT

from .flows import BenchFlow
from .procs import CpuMeter
from .scenarios import burst, stream_ids

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--replicas", default="1,2,4")
    parser.add_argument("--slots", type=int, default=4, help="ECHO_MAX_CONCURRENT per replica")
    parser.add_argument("--delay-s", type=float, default=0.02, help="ECHO_TOKEN_DELAY_S")
    parser.add_argument("--tokens", type=int, default=20, help="tokens per answer")
    parser.add_argument("--concurrency", type=int, default=32, help="workers streaming back to back")
    parser.add_argument("--streams-each", type=int, default=4)
    parser.add_argument("--json", type=Path, default=RESULTS / "replicas.json")
    args = parser.parse_args()
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
