"""What the store costs: server CPU per chunk and non-stream requests/s with ``--store`` memory, sqlite and redis.

In one run, for each back end in turn (each its own dataflow, the same scenarios): step mode
paced 1,000 streams x 30 tokens/s and a 64-stream step burst (server CPU per chunk), then
non-streaming requests/s at 64 concurrent. SQLite writes to a fresh file in the run's work
directory; Redis is a ``redis-server`` the run starts on a free port (``tests/redis_server.py``).
The ratios against memory are taken inside each run. Then, in this process, the bytes one stored
response costs in each back end: a Responses-shaped record (instructions, a user turn, 300 pieces
of answer text) written N times, the SQLite file's growth and Redis's ``used_memory`` growth per
record.

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.store --mode quick --runs 3

Results: ``benchmarks/results/store.json`` and a Markdown table on stdout (benchmarks/README.md, "The store").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from openai_stream_protocol import Part
from openai_stream_server.store.base import StoreOptions
from openai_stream_server.store.record import CompletionRecord, encode
from tests.redis_server import RedisServer

from . import scenarios
from .flows import ECHO, SERVER
from .run import MODES, Measured, Runner, log, raise_open_files_limit, run_async, warm_up

RESULTS = Path(__file__).resolve().parent / "results"
STORES = ("memory", "sqlite", "redis")
TARGETS = {"sqlite": 1.05, "redis": 1.25}
"""Server CPU per chunk on the streaming path, at most this many times memory's (step mode)."""
RATE_TARGET = 0.9
"""Non-stream requests/s with SQLite, at least this share of memory's."""


class StoreRunner(Runner):
    """The harness's runner with ``OPENAI_STREAM_SERVER_STORE`` set on the server node."""

    def __init__(self, *args: Any, store_url: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store_url = store_url

    def server_flow(self, name: str, echo_env: dict[str, Any], server_env: dict[str, Any] | None = None) -> Any:
        return super().server_flow(name, echo_env, {**(server_env or {}), "OPENAI_STREAM_SERVER_STORE": self.store_url})

    def step_burst(self, concurrency: int = 64, step_ms: float = 1.0) -> dict[str, Any]:
        """64 streams back to back, the echo stepping every ``step_ms``: server CPU per chunk."""
        mode = self.mode
        echo_env = {"ECHO_STEP_MS": step_ms, "ECHO_TOKEN_DELAY_S": 0, "ECHO_STAMP": 0}
        with self.server_flow(f"step-burst-{step_ms:g}", echo_env) as flow:
            server, echo = flow.node_pid(SERVER), flow.node_pid(ECHO)
            warm_up(flow.port, self.ids)
            with Measured(server, echo, flow.daemon_pid) as m:
                result = run_async(scenarios.burst(flow.port, concurrency, mode.burst_tokens, 2, self.ids, mode.timeout_s))
            result.update(m.per(result["tokens"]), step_ms=step_ms)
        return result

    def rate(self) -> dict[str, Any]:
        """Short non-streaming completions at 64 concurrent, the echo at 0 delay (the harness's rate scenario)."""
        mode = self.mode
        with self.server_flow("rate", {"ECHO_TOKEN_DELAY_S": 0, "ECHO_STAMP": 0}) as flow:
            server, echo = flow.node_pid(SERVER), flow.node_pid(ECHO)
            warm_up(flow.port, self.ids)
            with Measured(server, echo, flow.daemon_pid) as m:
                result = run_async(
                    scenarios.rate(
                        flow.port, mode.rate_concurrency, mode.rate_tokens, mode.rate_duration_s, self.ids, mode.timeout_s
                    )
                )
            result.update(m.per(result["completed"]))
        return result

    def figures(self) -> dict[str, Any]:
        streams, rate, tokens = self.mode.step_paced[0]
        paced = self.paced_once(1, streams=streams, rate=rate, tokens=tokens, step_ms=1000 / rate)
        burst = self.step_burst()
        requests = self.rate()
        return {
            "paced_cpu_us_per_chunk": paced["server_cpu_us_per_unit"],
            "paced_exact": paced["integrity"]["exact"],
            "paced_added_delay_p99_ms": paced["added_delay_p99_ms"],
            "burst_cpu_us_per_chunk": burst["server_cpu_us_per_unit"],
            "burst_exact": burst["integrity"]["exact"],
            "rate_per_s": requests["completions_per_s"],
            "rate_server_cpu_us_per_request": requests["server_cpu_us_per_unit"],
            "rate_exact": requests["integrity"]["exact"],
        }


def stored_response(i: int) -> CompletionRecord:
    """A typical stored response: instructions, one user turn, 300 pieces of a few characters each."""
    return CompletionRecord(
        id=f"resp_{i:048x}",
        surface="responses",
        model="dora-stream",
        created=1_700_000_000 + i,
        status="completed",
        finish_reason="stop",
        prompt_tokens=24,
        completion_tokens=300,
        pieces=[f"word{j % 97} " for j in range(300)],
        parts=[Part("system", "text", "You are a helpful assistant."), Part("user", "text", "Tell me a long story " * 4)],
        context={"instructions": "You are a helpful assistant.", "metadata": {}, "store": True, "input_from": 1},
        stored=True,
    )


async def bytes_per_record(workdir: Path, redis: RedisServer, n: int) -> dict[str, Any]:
    from openai_stream_server.store.redis_store import RedisStore
    from openai_stream_server.store.sqlite_store import SqliteStore

    encoded = len(encode(stored_response(0)))
    text = sum(len(p) for p in stored_response(0).pieces)

    path = workdir / "bytes.sqlite3"
    sqlite = SqliteStore(path, StoreOptions())
    await sqlite.start()
    sqlite.put(stored_response(-1))
    await sqlite.flush()

    def file_bytes() -> int:
        return sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))

    await sqlite._run(lambda: sqlite._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))  # type: ignore[union-attr]
    before = file_bytes()
    for i in range(n):
        sqlite.put(stored_response(i))
    await sqlite.flush()
    await sqlite._run(lambda: sqlite._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)"))  # type: ignore[union-attr]
    sqlite_bytes = (file_bytes() - before) / n
    await sqlite.aclose()

    store = RedisStore(redis.url, StoreOptions())
    await store.start()
    store.put(stored_response(-1))
    await store.flush()
    await asyncio.sleep(2)  # Redis frees the client's query buffer in its cron, not at once
    before = int((await store._client.info("memory"))["used_memory"])
    for i in range(n):
        store.put(stored_response(i))
        if i % 100 == 99:  # as the server writes: many small pipelines, not one huge command
            await store.flush()
    await store.flush()
    await asyncio.sleep(2)
    redis_bytes = (int((await store._client.info("memory"))["used_memory"]) - before) / n
    key_bytes = await store._client.memory_usage(f"oss:c:{stored_response(0).id}")
    await store.aclose()
    return {
        "records": n,
        "answer_text_bytes": text,
        "encoded_bytes": encoded,
        "sqlite_file_bytes_per_record": round(sqlite_bytes),
        "redis_used_memory_bytes_per_record": round(redis_bytes),
        "redis_record_key_bytes": key_bytes,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.store", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=sorted(MODES), default="quick", help="sizes, as benchmarks.run (default quick)")
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated: memory,sqlite,redis")
    parser.add_argument("--records", type=int, default=2000, help="records written for the bytes-per-record figure")
    parser.add_argument("--json", type=Path, default=RESULTS / "store.json")
    args = parser.parse_args(argv)
    raise_open_files_limit()
    mode = MODES[args.mode]
    wanted = [s for s in args.stores.split(",") if s]
    workdir = Path(tempfile.mkdtemp(prefix="oss-bench-store-"))
    harness = argparse.Namespace(tokens_per_chunk=1, server_src=None, profile=None)
    redis = RedisServer(workdir / "redis")
    redis.start()
    runs: list[dict[str, Any]] = []
    try:
        for i in range(args.runs):
            run: dict[str, Any] = {}
            for store in wanted:
                url = {"memory": "memory", "sqlite": f"sqlite://{workdir}/run{i}.sqlite3", "redis": redis.url}[store]
                log(f"run {i + 1}/{args.runs}: --store {url}")
                run[store] = StoreRunner(mode, harness, workdir, store_url=url).figures()
            runs.append(run)
        size = asyncio.run(bytes_per_record(workdir, redis, args.records))
    finally:
        redis.kill()
        shutil.rmtree(workdir, ignore_errors=True)

    def med(store: str, key: str) -> float | None:
        values = [r[store][key] for r in runs if r.get(store, {}).get(key) is not None]
        return statistics.median(values) if values else None

    def ratio(store: str, key: str) -> float | None:
        values = [r[store][key] / r["memory"][key] for r in runs if "memory" in r and r["memory"].get(key) and store in r]
        return round(statistics.median(values), 3) if values else None

    rows = ["| figure | " + " | ".join(wanted) + " |", "| :--- |" + " ---: |" * len(wanted)]
    for key, label in (
        ("paced_cpu_us_per_chunk", "step paced 1,000 x 30: server CPU per chunk (us)"),
        ("burst_cpu_us_per_chunk", "step burst 64 (1 ms steps): server CPU per chunk (us)"),
        ("rate_per_s", "non-stream requests/s (64 concurrent)"),
        ("rate_server_cpu_us_per_request", "non-stream: server CPU per request (us)"),
    ):
        cells = []
        for store in wanted:
            value = med(store, key)
            r = ratio(store, key) if store != "memory" else None
            cells.append("-" if value is None else f"{value:g}" + (f" ({r:g}x)" if r is not None else ""))
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    rows.append(
        f"| bytes per stored response ({size['answer_text_bytes']} bytes of text, {size['encoded_bytes']} encoded) | - | "
        f"{size['sqlite_file_bytes_per_record']} (file) | {size['redis_used_memory_bytes_per_record']} (used_memory) |"
    )
    exact = all(all(v for k, v in fig.items() if k.endswith("_exact")) for run in runs for fig in run.values())
    table = "\n".join(rows)
    document = {
        "mode": args.mode,
        "command": " ".join(["python -m benchmarks.store", *(argv if argv is not None else sys.argv[1:])]),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "runs": runs,
        "bytes": size,
        "targets": {"cpu_per_chunk_x_memory": TARGETS, "sqlite_rate_share": RATE_TARGET},
        "table": table,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1))
    print(table)
    if not exact:
        log("INTEGRITY FAILED: some stream lost, repeated or crossed a chunk")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
