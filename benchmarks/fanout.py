"""How answers reach only the server that asked: per-server chunk outputs against one output to all servers.

Two ways for a replica shared by N server processes to answer (docs/architecture.md, "Several server
processes"):

- **per-server** (``A``): the replica has one chunk output per server (``chunks/<server>``) and sends
  each answer on the one its request names; each server subscribes to its own output and receives
  only its own chunks;
- **shared** (``B``): the replica has one chunk output that every server subscribes to; each message
  carries the ``server`` it is for and each server drops the others' before parsing (a dict lookup
  on the metadata). In the batch form a step is one message for all servers (each server parses it
  and keeps its own rows: ``B1``) or one message per server on the shared output, dropped before
  parsing by its metadata (``B2``).

This measures both on dora alone, no HTTP: one replica node (``_fanout_node.py replica``) sends
chunks at a fixed rate for N servers in turn, each server node (``_fanout_node.py server``) receives
exactly as the server's reader thread does (``node.next()``, ``node.drain()``, ``texts_of`` and
``parse_chunk``, or ``parse_batch``) and reports its own CPU and the chunks that were its own. The
CPU of the replica and of ``dora run`` (the daemon that routes every message) is read from ``/proc``.

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.fanout --runs 3

Results: ``benchmarks/results/fanout.json`` and a Markdown table on stdout (benchmarks/README.md,
"Several server processes").
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from .flows import BenchFlow
from .procs import cpu_seconds

RESULTS = Path(__file__).resolve().parent / "results"
NODE = Path(__file__).resolve().parent / "dataflows" / "_fanout_node.py"
QUEUE = {"queue_size": 100000, "queue_policy": "backpressure"}

VARIANTS = {
    # name: (form, layout)
    "A-single": ("single", "per-server"),
    "B-single": ("single", "shared"),
    "A-batch": ("batch", "per-server"),
    "B1-batch": ("batch", "shared-one"),
    "B2-batch": ("batch", "shared"),
}


def descriptor(servers: int, form: str, layout: str, rate: float, seconds: float, rows: int) -> dict[str, Any]:
    names = [f"server-{i}" for i in range(1, servers + 1)]
    per_server = layout == "per-server"
    outputs = [f"chunks/{n}" for n in names] if per_server else ["chunks"]
    env = {
        "FANOUT_FORM": form,
        "FANOUT_LAYOUT": layout,
        "FANOUT_SERVERS": ",".join(names),
        "FANOUT_RATE": rate,
        "FANOUT_SECONDS": seconds,
        "FANOUT_ROWS": rows,
    }
    nodes: list[dict[str, Any]] = [
        {
            "id": "replica",
            "path": str(NODE),
            "args": "replica",
            "inputs": {"tick": "dora/timer/millis/100"},
            "outputs": outputs,
            "env": env,
        }
    ]
    for name in names:
        source = f"replica/chunks/{name}" if per_server else "replica/chunks"
        nodes.append(
            {
                "id": name,
                "path": str(NODE),
                "args": "server",
                "inputs": {"chunks": {"source": source, **QUEUE}},
                "env": {**env, "FANOUT_ME": name},
            }
        )
    return {"nodes": nodes}


def run_once(workdir: Path, servers: int, variant: str, rate: float, seconds: float, rows: int) -> dict[str, Any]:
    form, layout = VARIANTS[variant]
    workdir.mkdir(parents=True, exist_ok=True)
    yml = workdir / "fanout.yml"
    yml.write_text(yaml.safe_dump(descriptor(servers, form, layout, rate, seconds, rows), sort_keys=False))
    flow = BenchFlow(yml, workdir / "run", ready_path=None, ready_timeout_s=60)
    flow.start()
    try:
        assert flow.process is not None
        samples: list[tuple[float, float]] = []  # (time.time(), CPU of dora run): the daemon's share while sending
        deadline = time.monotonic() + seconds + 90
        while flow.process.poll() is None and time.monotonic() < deadline:
            samples.append((time.time(), cpu_seconds(flow.process.pid)))
            time.sleep(0.05)
        flow.wait_exit(30)
    finally:
        flow.stop()
    reports = [json.loads(p.read_text()) for p in sorted((workdir / "run").glob("fanout-server-*.json"))]
    sender = json.loads((workdir / "run" / "fanout-replica.json").read_text())
    daemon_cpu = _at(samples, sender["ended"]) - _at(samples, sender["started"])
    own = sum(r["own"] for r in reports)
    server_cpu = [r["cpu_s"] for r in reports]
    return {
        "variant": variant,
        "servers": servers,
        "form": form,
        "layout": layout,
        "own_chunks": own,
        "expected_chunks": sum(r["expected"] for r in reports),
        "received_messages": sum(r["messages"] for r in reports),
        "dropped_before_parsing": sum(r["dropped"] for r in reports),
        "server_cpu_s": server_cpu,
        "server_cpu_us_per_own_chunk": round(sum(server_cpu) / own * 1e6, 3) if own else None,
        "replica_cpu_us_per_chunk": round(sender["cpu_s"] / own * 1e6, 3) if own else None,
        "daemon_cpu_us_per_chunk": round(daemon_cpu / own * 1e6, 3) if own else None,
    }


def _at(samples: list[tuple[float, float]], when: float) -> float:
    """The sampled CPU figure at ``when`` (the first sample at or after it; the last one if none)."""
    for at, value in samples:
        if at >= when:
            return value
    return samples[-1][1] if samples else 0.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--servers", default="2", help="comma-separated server counts (default 2)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"some of {', '.join(VARIANTS)}")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=4000, help="single form: chunks/s over all servers")
    parser.add_argument("--step-ms", type=float, default=20, help="batch form: one step every this many ms")
    parser.add_argument("--rows", type=int, default=500, help="batch form: rows per server per step")
    parser.add_argument("--seconds", type=float, default=4)
    parser.add_argument("--json", type=Path, default=RESULTS / "fanout.json")
    args = parser.parse_args(argv)
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="oss-fanout-") as tmp:
        for run in range(args.runs):
            for servers in (int(s) for s in args.servers.split(",")):
                for variant in args.variants.split(","):
                    rate = args.rate if VARIANTS[variant][0] == "single" else 1000 / args.step_ms
                    r = run_once(Path(tmp) / f"{run}-{servers}-{variant}", servers, variant, rate, args.seconds, args.rows)
                    r["run"] = run
                    results.append(r)
                    print(
                        f"run {run} {variant} x{servers}: own {r['own_chunks']}/{r['expected_chunks']},"
                        f" server {r['server_cpu_us_per_own_chunk']} us/chunk, replica {r['replica_cpu_us_per_chunk']},"
                        f" daemon {r['daemon_cpu_us_per_chunk']}",
                        file=sys.stderr,
                        flush=True,
                    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=1))
    print("| variant | servers | own / expected | server CPU per own chunk (us) | replica per chunk | daemon per chunk |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    keys = sorted({(r["variant"], r["servers"]) for r in results}, key=lambda k: (k[1], list(VARIANTS).index(k[0])))
    for variant, servers in keys:
        rs = [r for r in results if r["variant"] == variant and r["servers"] == servers]

        def med(key: str, rs: list[dict[str, Any]] = rs) -> float | None:
            values = [r[key] for r in rs if r[key] is not None]
            return round(statistics.median(values), 2) if values else None

        exact = all(r["own_chunks"] == r["expected_chunks"] for r in rs)
        print(
            f"| {variant} | {servers} | {'all' if exact else 'LOST'} | {med('server_cpu_us_per_own_chunk')} |"
            f" {med('replica_cpu_us_per_chunk')} | {med('daemon_cpu_us_per_chunk')} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
