"""Several machines: the cliff of per-token messages between daemons, and what resends cost when nothing is lost.

**The cliff** (``--cliff``): a coordinator and daemons A and B on loopback (``tests/e2e/test_cluster.py``'s
``Cluster``), ``dataflow-cluster.yml`` as shipped (resends on) with its two echo replicas on B either in
per-token mode (``ECHO_TOKEN_DELAY_S`` 0.02: one message per token) or in step mode (``ECHO_STEP_MS`` 20:
one message per 20 ms step holding every request's next token). At each level, that many streams of 60
tokens are opened at once and every one is checked word by word; beside it, how many inter-daemon
messages daemon B dropped ("zenoh publish channel full" in its log) and the server's resend counters.
Levels go up until a level loses a stream (one more is run to confirm).

**Resend overhead** (``--overhead``): the step-mode paced run of the main harness (1,000 streams x 30
tokens/s under ``dora run``, ``dataflow-stream.yml``, one step every 33.3 ms), with the resend input
wired (the node keeps its recent chunks, the server sweeps for holes) and without, alternated in one
run: server and node CPU per chunk and the added delay. Nothing is lost there, so the difference is
what the resend memory and the sweep cost.

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.cluster --cliff
    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.cluster --overhead --runs 2

Results: ``benchmarks/results/cluster.json`` and Markdown tables on stdout (benchmarks/README.md,
"Several machines").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from tests.dataflow import ROOT, free_port
from tests.e2e.test_cluster import Cluster, node_id_of

from .flows import BenchFlow
from .procs import CpuMeter
from .scenarios import paced, stream_ids

RESULTS = Path(__file__).resolve().parent / "results"
SERVER = "openai-stream-server"
TOKENS = 60
DELAY_S = 0.02
CHANNEL_FULL = "publish channel full"


def get_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:  # noqa: S310 (127.0.0.1)
        data = response.read()
    return json.loads(data) if path != "/metrics" else data.decode()


def counter(metrics: str, name: str) -> float:
    for line in metrics.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return 0.0


def cluster_spec(mode: str, resend: bool = True) -> dict[str, Any]:
    """``dataflow-cluster.yml`` without build lines, its store in memory, its replicas per token or in steps; without
    ``resend``, the resend outputs and inputs taken out (the flow before resends)."""
    spec = yaml.safe_load((ROOT / "dataflow-cluster.yml").read_text())
    for node in spec["nodes"]:
        node.pop("build", None)
        if not resend:
            node["inputs"].pop("resend", None)
            node["outputs"] = [o for o in node.get("outputs") or [] if not o.startswith("resend")]
        if node["id"] == SERVER:
            node["env"]["OPENAI_STREAM_SERVER_STORE"] = "memory"
        elif mode == "per-token":
            node["env"] = {"ECHO_TOKEN_DELAY_S": DELAY_S}
        else:
            node["env"] = {"ECHO_STEP_MS": DELAY_S * 1000}
    return spec


def dropped_by_daemons(cluster: Cluster) -> int:
    """Inter-daemon messages dropped so far: the daemons' "publish channel full" lines, in their own logs and dora's."""
    total = 0
    for log in [*cluster.workdir.glob("daemon-*.log"), *cluster.workdir.glob("**/dora-daemon-*.txt")]:
        total += log.read_text(errors="replace").count(CHANNEL_FULL)
    return total


def cliff_mode(mode: str, levels: list[int], workdir: Path, resend: bool = True, rounds: int = 1) -> list[dict[str, Any]]:
    port = free_port()
    rows: list[dict[str, Any]] = []
    machines = {"A": {"OPENAI_STREAM_SERVER_PORT": str(port)}, "B": {}}
    here = workdir / f"{mode}-{'resend' if resend else 'no-resend'}"
    here.mkdir(parents=True)
    with Cluster(here, machines) as cluster:
        yml = cluster.workdir / "dataflow.yml"
        yml.write_text(yaml.safe_dump(cluster_spec(mode, resend), sort_keys=False))
        cluster.dora_start(yml, "cluster-test")
        deadline = time.monotonic() + 90
        while True:
            try:
                if get_json(port, "/health")["replicas"]:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up\n{cluster.logs()}")
            time.sleep(0.2)
        assert {SERVER, "echo-stream-1", "echo-stream-2"} <= {node_id_of(p) for p in cluster.record_nodes()}
        ids = stream_ids(1)
        failed_levels = 0
        for n in [n for n in levels for _ in range(rounds)]:
            before_drops, before = dropped_by_daemons(cluster), get_json(port, "/metrics")
            result = asyncio.run(paced(port, n, TOKENS, 1 / DELAY_S, ids, 120))
            time.sleep(1.0)  # the daemons' log lines of the last drops
            after = get_json(port, "/metrics")
            integrity = result["integrity"]
            row = {
                "mode": mode,
                "resend": resend,
                "streams": n,
                "exact": integrity["ok"],
                "lost_tokens": integrity["lost"],
                "failed": integrity["failed"],
                "dropped_messages": dropped_by_daemons(cluster) - before_drops,
                "wall_s": result["wall_s"],
                "delivered_tokens_per_s": result["delivered_tokens_per_s"],
                "errors": integrity.get("errors", [])[:3],
            }
            for key in ("requested", "served", "failed"):
                name = f"oss_resends_{key}_total"
                row[f"resends_{key}"] = int(counter(after, name) - counter(before, name))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if row["exact"] < n and rounds == 1:
                failed_levels += 1
                if failed_levels >= 2:
                    break
            time.sleep(2.0)  # the replicas' resend memories and the server's loss window settle
        cluster.record_nodes()
    return rows


def overhead_once(resend: bool, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The step-mode paced run, the resend input wired or not."""

    def transform(spec: dict[str, Any]) -> dict[str, Any]:
        if resend:
            nodes = {node["id"]: node for node in spec["nodes"]}
            nodes[SERVER]["outputs"].append("resend")
            nodes["echo-stream"]["inputs"]["resend"] = {
                "source": f"{SERVER}/resend",
                "queue_size": 100000,
                "queue_policy": "backpressure",
            }
        return spec

    env = {
        "echo-stream": {"ECHO_STEP_MS": str(1000 / args.rate), "ECHO_STAMP": "1", "ECHO_TOKEN_DELAY_S": "0"},
        SERVER: {"OPENAI_STREAM_SERVER_RELAY_SENT_AT": "1"},  # the added delay, from the step's stamp
    }
    tag = "on" if resend else "off"
    with BenchFlow(
        ROOT / "dataflow-stream.yml", workdir / f"overhead-{tag}-{time.monotonic_ns()}", env=env, transform=transform
    ) as flow:
        server, node = CpuMeter(flow.node_pid(SERVER)), CpuMeter(flow.node_pid("echo-stream"))
        ids = stream_ids(1)
        asyncio.run(paced(flow.port, 20, 10, args.rate, ids, 60))  # warm-up
        server.start()
        node.start()
        result = asyncio.run(paced(flow.port, args.streams, args.tokens, args.rate, ids, 180))
        server_s, node_s = server.stop(), node.stop()
        metrics = get_json(flow.port, "/metrics")
    chunks = args.streams * args.tokens
    return {
        "resend": tag,
        "exact": result["integrity"]["ok"] == args.streams and result["integrity"]["lost"] == 0,
        "server_us_per_chunk": round(server_s / chunks * 1e6, 2),
        "node_us_per_chunk": round(node_s / chunks * 1e6, 2),
        "added_delay_p50_ms": result["added_delay_p50_ms"],
        "added_delay_p99_ms": result["added_delay_p99_ms"],
        "delivered_tokens_per_s": result["delivered_tokens_per_s"],
        "resends_requested": int(counter(metrics, "oss_resends_requested_total")),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cliff", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--no-resend", action="store_true", help="cliff: the flow without its resend outputs and inputs")
    parser.add_argument("--rounds", type=int, default=1, help="cliff: each level this many times (then every level runs)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="cliff: a new cluster for each level and round (a level that lost chunks leaves nothing behind for the next)",
    )
    parser.add_argument("--per-token-levels", default="25,50,100,200")
    parser.add_argument("--step-levels", default="100,300,1000")
    parser.add_argument("--runs", type=int, default=2, help="overhead: runs of each, alternated")
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--tokens", type=int, default=150)
    parser.add_argument("--rate", type=float, default=30.0)
    args = parser.parse_args()
    out: dict[str, Any] = {"at": time.strftime("%Y-%m-%d %H:%M")}
    with tempfile.TemporaryDirectory(prefix="oss-cluster-") as tmp:
        workdir = Path(tmp)
        if args.cliff:
            out["cliff"] = []
            for mode, levels in (("per-token", args.per_token_levels), ("step", args.step_levels)):
                counts = [int(x) for x in levels.split(",")]
                if args.fresh:
                    for i, n in enumerate(n for n in counts for _ in range(args.rounds)):
                        out["cliff"] += cliff_mode(mode, [n], workdir / f"{mode}-{i}", not args.no_resend)
                else:
                    out["cliff"] += cliff_mode(mode, counts, workdir, not args.no_resend, args.rounds)
            print("\n| mode | resend | streams | exact | inter-daemon messages dropped | resends requested / served / failed |")
            print("| --- | --- | ---: | ---: | ---: | ---: |")
            for r in out["cliff"]:
                resends = f"{r['resends_requested']} / {r['resends_served']} / {r['resends_failed']}"
                on = "on" if r["resend"] else "off"
                print(f"| {r['mode']} | {on} | {r['streams']} | {r['exact']} | {r['dropped_messages']} | {resends} |")
        if args.overhead:
            runs = []
            for _ in range(args.runs):
                for resend in (False, True):
                    runs.append(overhead_once(resend, args, workdir))
                    print(json.dumps(runs[-1]), flush=True)
            out["overhead"] = runs
            print("\n| resend | server us/chunk | node us/chunk | added delay p50 / p99 ms | exact |")
            print("| --- | ---: | ---: | ---: | --- |")
            for tag in ("off", "on"):
                mine = [r for r in runs if r["resend"] == tag]

                def med(key: str, rows: list[dict[str, Any]] = mine) -> float:
                    return round(statistics.median(r[key] for r in rows), 2)

                print(
                    f"| {tag} | {med('server_us_per_chunk')} | {med('node_us_per_chunk')} | "
                    f"{med('added_delay_p50_ms')} / {med('added_delay_p99_ms')} | {all(r['exact'] for r in mine)} |"
                )
    RESULTS.mkdir(exist_ok=True)
    name = "cluster-no-resend.json" if args.no_resend and not args.overhead else "cluster.json"
    (RESULTS / name).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
