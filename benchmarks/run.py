"""One command for the whole benchmark: ``python -m benchmarks.run [--mode quick|smoke] [--runs 3]``.

Each run starts, measures and stops, in this order: the raw dora relay
ceiling (``dataflows/relay.yml``), the raw SSE write ceiling
(``sse_ceiling.py``), the server with echo_stream at 0 delay (burst at each
concurrency, then the non-streaming request rate), the server with
echo_stream paced at 30 tokens/s (1,000 streams, added delay, memory) and the
seed's ``dora-openai-server`` 0.5.0 with ``dora-echo`` (request rate). See
``benchmarks/README.md`` for what each figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

from . import report, scenarios
from .flows import DATAFLOWS, ECHO, SERVER, BenchFlow, SseCeiling
from .procs import cpu_seconds, memory_kib, thread_cpu_seconds

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
T = TypeVar("T")


@dataclass(frozen=True)
class Mode:
    levels: tuple[int, ...] = (1, 16, 64, 256)
    """Concurrent streams in the burst scenario."""
    burst_tokens: int = 512
    """Tokens per burst answer (one chunk each at ECHO_TOKENS_PER_CHUNK=1)."""
    burst_chunks: int = 65536
    """About this many chunks per burst level: each worker streams several answers back to back."""
    paced_streams: int = 1000
    paced_tokens: int = 300
    paced_rate: float = 30.0
    """Tokens per second per paced stream (echo_stream's ECHO_TOKEN_DELAY_S = 1 / rate)."""
    rate_concurrency: int = 64
    rate_tokens: int = 8
    rate_duration_s: float = 5.0
    rtt_n: int = 200
    """Sequential requests for time to first chunk: one client, short answers (and as many raw round trips)."""
    ttfc_tokens: int = 8
    paced_chunk_tokens: tuple[int, ...] = (1, 4)
    """Paced runs: echo_stream's ECHO_TOKENS_PER_CHUNK (1: one dora message per token; more: the batching lever)."""
    idle_streams: int = 1000
    idle_s: float = 4.0
    """Idle-memory run: the echo holds its first token this long; RSS is read while all streams are open."""
    timeout_s: float = 120.0
    """Per request; every scenario is also bounded by its count of streams or its duration."""
    step_levels: tuple[int, ...] = (64,)
    """Step mode (echo_stream's ``ECHO_STEP_MS``, the batch form): burst concurrencies."""
    step_burst_ms: tuple[float, ...] = (0.1, 1.0)
    """Step mode burst: one batch message every this many ms. 0.1 ms is an engine stepping as fast as it can (what
    echo at 0 delay is per message); at 1 ms the server keeps up, so streams coalesce less (more events per chunk)."""
    step_paced: tuple[tuple[int, float, int], ...] = ((1000, 30.0, 300), (4000, 10.0, 100))
    """Step mode paced runs: (streams, tokens/s per stream, tokens per stream); one step every 1 / rate."""


MODES = {
    "full": Mode(),
    "quick": Mode(
        burst_tokens=256,
        burst_chunks=16384,
        paced_tokens=150,
        rate_duration_s=2.0,
        rtt_n=100,
        idle_s=3.0,
        step_paced=((1000, 30.0, 150), (4000, 10.0, 100)),
    ),
    "smoke": Mode(
        levels=(1, 8),
        burst_tokens=32,
        burst_chunks=256,
        paced_streams=20,
        paced_tokens=10,
        rate_concurrency=8,
        rate_duration_s=0.5,
        rtt_n=10,
        paced_chunk_tokens=(1,),
        step_levels=(8,),
        step_paced=((20, 30.0, 10),),
        idle_streams=20,
        idle_s=1.0,
        timeout_s=30.0,
    ),
}


def streams_each(mode: Mode, concurrency: int) -> int:
    return max(1, round(mode.burst_chunks / (concurrency * mode.burst_tokens)))


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Measured:
    """CPU seconds of the server (and the echo node, and this client) over one scenario."""

    def __init__(self, server: int, echo: int | None = None, daemon: int | None = None) -> None:
        self.pids = {"server": server, **({"echo": echo} if echo else {}), **({"daemon": daemon} if daemon else {})}

    def __enter__(self) -> Measured:
        self.before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        self.threads_before = thread_cpu_seconds(self.pids["server"])
        self.client_before = time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cpu = {name: cpu_seconds(pid) - self.before[name] for name, pid in self.pids.items()}
        self.cpu["client"] = time.process_time() - self.client_before
        after = thread_cpu_seconds(self.pids["server"])
        self.threads = {
            k: round(v - self.threads_before.get(k, 0.0), 3) for k, v in after.items() if v - self.threads_before.get(k, 0.0) > 0
        }

    def per(self, count: int) -> dict[str, Any]:
        """CPU figures, with microseconds per unit of ``count`` (chunks or requests)."""
        out: dict[str, Any] = {f"{name}_cpu_s": round(used, 3) for name, used in self.cpu.items()}
        for name, used in self.cpu.items():
            out[f"{name}_cpu_us_per_unit"] = round(used / count * 1e6, 2) if count else None
        out["server_threads_cpu_s"] = self.threads
        return out


@contextlib.contextmanager
def py_spy(pid: int, path: Path, fmt: str) -> Iterator[None]:
    """``py-spy record`` on ``pid`` for the duration of the block (SIGINT makes it write ``path``)."""
    exe = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if exe is None:
        log("py-spy not found: pip install py-spy")
        yield
        return
    command = [
        exe,
        "record",
        "--pid",
        str(pid),
        "--rate",
        "250",
        "--format",
        fmt,
        "--output",
        str(path),
        "--nonblocking",
        "--threads",
    ]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    time.sleep(1.0)  # attach
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


def run_async(coroutine: Awaitable[T]) -> T:
    import uvloop  # the client too runs on uvloop: less of its CPU in the way on a 2-core machine

    async def wrapper() -> T:
        return await coroutine

    return uvloop.run(wrapper())


def warm_up(port: int, ids: Iterator[int], tokens: int = 16, each: int = 2, timeout_s: float = 30) -> None:
    run_async(scenarios.burst(port, 4, tokens, each, ids, timeout_s))


class Runner:
    def __init__(self, mode: Mode, args: argparse.Namespace, workdir: Path) -> None:
        self.mode = mode
        self.args = args
        self.workdir = workdir
        self.ids = scenarios.stream_ids()
        self.profiled = False

    def _dir(self, name: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=self.workdir))
        return path

    # -- ceilings ------------------------------------------------------------

    def relay(self) -> dict[str, Any]:
        mode = self.mode
        workdir = self._dir("relay")
        out = workdir / "raw.json"
        levels = ",".join(f"{c}:{streams_each(mode, c)}" for c in mode.levels)
        env = {
            "raw-client": {
                "RAW_OUT": str(out),
                "RAW_TOKENS": mode.burst_tokens,
                "RAW_LEVELS": levels,
                "RAW_RTT_N": mode.rtt_n,
                "RAW_RTT_TOKENS": mode.ttfc_tokens,
                "RAW_BUDGET_S": mode.timeout_s * 2,
            },
            "echo-stream": {"ECHO_TOKENS_PER_CHUNK": self.args.tokens_per_chunk},
        }
        flow = BenchFlow(DATAFLOWS / "relay.yml", workdir, env=env, ready_path=None)
        flow.start()
        try:
            code = flow.wait_exit(mode.timeout_s * 2 + 30)
        finally:
            flow.stop()
        if code != 0 or not out.exists():
            raise RuntimeError(f"the relay ceiling failed (exit {code}):\n{flow.log()}")
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def sse(self) -> dict[str, Any]:
        mode = self.mode
        with SseCeiling(self._dir("sse")) as ceiling:
            warm_up(ceiling.port, self.ids)
            levels = []
            for c in mode.levels:
                with Measured(ceiling.pid) as m:
                    result = run_async(
                        scenarios.burst(ceiling.port, c, mode.burst_tokens, streams_each(mode, c), self.ids, mode.timeout_s)
                    )
                result.update(m.per(result["events"]))
                levels.append(result)
            with Measured(ceiling.pid) as m:
                rate = run_async(
                    scenarios.rate(
                        ceiling.port, mode.rate_concurrency, mode.rate_tokens, mode.rate_duration_s, self.ids, mode.timeout_s
                    )
                )
            rate.update(m.per(rate["completed"]))
        return {"levels": levels, "rate": rate}

    # -- the server ------------------------------------------------------------

    def server_flow(self, name: str, echo_env: dict[str, Any], server_env: dict[str, Any] | None = None) -> BenchFlow:
        env = {
            "echo-stream": {"ECHO_TOKENS_PER_CHUNK": self.args.tokens_per_chunk, **echo_env},
            SERVER: {**(server_env or {}), **({"PYTHONPATH": str(self.args.server_src)} if self.args.server_src else {})},
        }
        return BenchFlow(DATAFLOWS / "stream.yml", self._dir(name), env=env)

    def burst(self) -> dict[str, Any]:
        mode = self.mode
        with self.server_flow("burst", {"ECHO_TOKEN_DELAY_S": 0, "ECHO_STAMP": 0}) as flow:
            server, echo = flow.node_pid(SERVER), flow.node_pid(ECHO)
            warm_up(flow.port, self.ids)
            levels = []
            for c in mode.levels:
                profile = self.args.profile is not None and not self.profiled and c == 64
                if profile:
                    self.profile(flow.port, server, c)
                with Measured(server, echo, flow.daemon_pid) as m:
                    result = run_async(
                        scenarios.burst(flow.port, c, mode.burst_tokens, streams_each(mode, c), self.ids, mode.timeout_s)
                    )
                result.update(m.per(result["tokens"] // self.args.tokens_per_chunk))
                levels.append(result)
                log(f"  server burst c={c}: {result['tokens_per_s']:.0f} tokens/s, exact={result['integrity']['exact']}")
            # Time to first chunk: one client, short answers one after another (the raw round trip's shape).
            ttfc = run_async(scenarios.burst(flow.port, 1, mode.ttfc_tokens, mode.rtt_n, self.ids, mode.timeout_s))
            with Measured(server, echo, flow.daemon_pid) as m:
                rate = run_async(
                    scenarios.rate(
                        flow.port, mode.rate_concurrency, mode.rate_tokens, mode.rate_duration_s, self.ids, mode.timeout_s
                    )
                )
            rate.update(m.per(rate["completed"]))
            rss, hwm = memory_kib(server)
        return {"levels": levels, "ttfc": ttfc, "rate": rate, "rss_kib": rss, "peak_rss_kib": hwm}

    def profile(self, port: int, server: int, concurrency: int) -> None:
        """Two extra bursts under py-spy: collapsed stacks (summarised in text) and a flame graph."""
        mode = self.mode
        out_dir: Path = self.args.profile
        out_dir.mkdir(parents=True, exist_ok=True)
        for fmt, name in (("raw", f"burst{concurrency}.txt"), ("flamegraph", f"burst{concurrency}.svg")):
            with py_spy(server, out_dir / name, fmt):
                run_async(
                    scenarios.burst(
                        port, concurrency, mode.burst_tokens, streams_each(mode, concurrency), self.ids, mode.timeout_s
                    )
                )
        raw = out_dir / f"burst{concurrency}.txt"
        if raw.exists():
            summary = report.profile_summary(raw.read_text())
            (out_dir / f"burst{concurrency}-summary.txt").write_text(summary)
            log(summary)
        self.profiled = True

    def paced(self) -> list[dict[str, Any]]:
        return [self.paced_once(k) for k in self.mode.paced_chunk_tokens]

    def step(self) -> dict[str, Any]:
        """Step mode: echo_stream sends one batch message per step, every active request's chunk in it."""
        mode = self.mode
        levels = []
        for step_ms in mode.step_burst_ms:
            echo_env = {"ECHO_STEP_MS": step_ms, "ECHO_TOKEN_DELAY_S": 0, "ECHO_STAMP": 0}
            with self.server_flow(f"step-burst-{step_ms:g}", echo_env) as flow:
                server, echo = flow.node_pid(SERVER), flow.node_pid(ECHO)
                warm_up(flow.port, self.ids)
                for c in mode.step_levels:
                    with Measured(server, echo, flow.daemon_pid) as m:
                        result = run_async(
                            scenarios.burst(flow.port, c, mode.burst_tokens, streams_each(mode, c), self.ids, mode.timeout_s)
                        )
                    result.update(m.per(result["tokens"] // self.args.tokens_per_chunk), step_ms=step_ms)
                    levels.append(result)
                    log(
                        f"  step burst c={c} every {step_ms:g} ms: {result['tokens_per_s']:.0f} tokens/s,"
                        f" {result['server_cpu_us_per_unit']} us/chunk, exact={result['integrity']['exact']}"
                    )
        paced = [
            self.paced_once(self.args.tokens_per_chunk, streams=n, rate=rate, tokens=tokens, step_ms=1000 / rate)
            for n, rate, tokens in mode.step_paced
        ]
        return {"levels": levels, "paced": paced, "ceiling": [self.step_ceiling(*p) for p in mode.step_paced]}

    def step_ceiling(self, streams: int, rate: float, tokens: int) -> dict[str, Any]:
        """The same paced scenario against the raw SSE app on one step clock: the HTTP side's floor, no dora."""
        mode = self.mode
        with SseCeiling(self._dir("sse-step"), step_ms=1000 / rate) as ceiling:
            warm_up(ceiling.port, self.ids, tokens=4)
            with Measured(ceiling.pid) as m:
                result = run_async(scenarios.paced(ceiling.port, streams, tokens, rate, self.ids, mode.timeout_s))
            result.update(m.per(result["events"]))
        log(f"  SSE ceiling, paced {streams} x {rate:g}/s on one step clock: p99 {result['added_delay_p99_ms']} ms")
        return result

    def paced_once(
        self,
        chunk_tokens: int,
        *,
        streams: int | None = None,
        rate: float | None = None,
        tokens: int | None = None,
        step_ms: float | None = None,
    ) -> dict[str, Any]:
        mode = self.mode
        streams = streams or mode.paced_streams
        rate = rate or mode.paced_rate
        tokens = tokens or mode.paced_tokens
        echo_env: dict[str, Any] = {"ECHO_TOKEN_DELAY_S": 1 / rate, "ECHO_STAMP": 1, "ECHO_TOKENS_PER_CHUNK": chunk_tokens}
        if step_ms:
            echo_env["ECHO_STEP_MS"] = step_ms
        server_env = {"OPENAI_STREAM_SERVER_RELAY_SENT_AT": 1}
        name = f"paced-k{chunk_tokens}" if not step_ms else f"step-paced-{streams}"
        with self.server_flow(name, echo_env, server_env) as flow:
            server, echo = flow.node_pid(SERVER), flow.node_pid(ECHO)
            warm_up(flow.port, self.ids)
            baseline, _ = memory_kib(server)
            peak = baseline

            async def sample_memory(stop: asyncio.Event) -> None:
                nonlocal peak
                while not stop.is_set():
                    peak = max(peak, memory_kib(server)[0])
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), 0.05)

            async def scenario() -> dict[str, Any]:
                stop = asyncio.Event()
                sampler = asyncio.create_task(sample_memory(stop))
                try:
                    return await scenarios.paced(flow.port, streams, tokens, rate, self.ids, mode.timeout_s)
                finally:
                    stop.set()
                    await sampler

            with Measured(server, echo, flow.daemon_pid) as m:
                result = run_async(scenario())
            result.update(m.per(-(-result["tokens"] // chunk_tokens)))
            _, hwm = memory_kib(server)
        log(
            f"  paced {streams} x {rate:g}/s k={chunk_tokens}{f' step {step_ms:g} ms' if step_ms else ''}:"
            f" {result['delivered_tokens_per_s']:.0f} tokens/s, p99 {result['added_delay_p99_ms']} ms,"
            f" exact={result['integrity']['exact']}"
        )
        result.update(
            chunk_tokens=chunk_tokens,
            step_ms=step_ms,
            baseline_rss_kib=baseline,
            peak_rss_kib=peak,
            rss_kib_per_stream=round((peak - baseline) / streams, 2),
            lifetime_peak_rss_kib=hwm,
        )
        return result

    def idle(self) -> dict[str, Any]:
        """RSS per open idle stream: every stream waits ``idle_s`` for its only token (headers sent, pings due)."""
        mode = self.mode
        with self.server_flow("idle", {"ECHO_TOKEN_DELAY_S": mode.idle_s, "ECHO_STAMP": 0}) as flow:
            server = flow.node_pid(SERVER)
            warm_up(flow.port, self.ids, tokens=1, each=1, timeout_s=mode.idle_s + 30)  # one token: idle_s per stream
            baseline, _ = memory_kib(server)

            async def scenario() -> tuple[dict[str, Any], int]:
                streams = asyncio.ensure_future(
                    scenarios.burst(flow.port, mode.idle_streams, 1, 1, self.ids, mode.timeout_s + mode.idle_s)
                )
                await asyncio.sleep(mode.idle_s * 0.8)  # all opened (and past the header grace period), none answered
                rss = memory_kib(server)[0]
                return await streams, rss

            result, rss = run_async(scenario())
        result.update(
            idle_s=mode.idle_s,
            baseline_rss_kib=baseline,
            open_rss_kib=rss,
            rss_kib_per_stream=round((rss - baseline) / mode.idle_streams, 2),
        )
        log(f"  idle: {result['rss_kib_per_stream']} KiB per open stream, exact={result['integrity']['exact']}")
        return result

    def seed(self) -> dict[str, Any]:
        mode = self.mode
        flow = BenchFlow(DATAFLOWS / "seed.yml", self._dir("seed"), ready_path="/v1/models")
        with flow:
            server = flow.node_pid("seed_server.py")
            with Measured(server, None, flow.daemon_pid) as m:
                rate = run_async(
                    scenarios.rate(
                        flow.port, mode.rate_concurrency, mode.rate_tokens, mode.rate_duration_s, self.ids, mode.timeout_s
                    )
                )
            rate.update(m.per(rate["completed"]))
        return {"rate": rate}

    def once(self) -> dict[str, Any]:
        steps: list[tuple[str, Callable[[], Any]]] = []
        if not self.args.no_ceilings:
            steps += [("relay", self.relay), ("sse", self.sse)]
        steps += [("server", self.burst), ("paced", self.paced), ("step", self.step), ("idle", self.idle)]
        if self.args.seed:
            steps.append(("seed", self.seed))
        if self.args.only:
            wanted = set(self.args.only.split(","))
            steps = [step for step in steps if step[0] in wanted]
        result: dict[str, Any] = {}
        for name, step in steps:
            started = time.perf_counter()
            log(f"- {name} ...")
            result[name] = step()
            log(f"  {name} took {time.perf_counter() - started:.1f} s")
        return result


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "dora_rs": version("dora-rs"),
        "uvicorn": version("uvicorn"),
        "uvloop": version("uvloop"),
        "sse_starlette": version("sse-starlette"),
        "load_avg_at_start": os.getloadavg(),
    }


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: 4,000 paced streams are 4,000 sockets in this client and in the
    server (``dora run`` and its nodes inherit the limit)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        soft = 1 << 20 if hard == resource.RLIM_INFINITY else hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < 10_000:
        log(f"RLIMIT_NOFILE is {soft}: the 4,000-stream run may fail to open its sockets")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mode", choices=sorted(MODES), default="full", help="full (default), quick (~1 min), smoke (seconds)")
    parser.add_argument("--runs", type=int, default=1, help="repeat the whole run; the summary shows medians (targets: 3)")
    parser.add_argument("--levels", help="burst concurrencies, comma-separated (default per mode: 1,16,64,256)")
    parser.add_argument("--tokens-per-chunk", type=int, default=1, help="echo_stream's ECHO_TOKENS_PER_CHUNK (default 1)")
    parser.add_argument(
        "--seed", action=argparse.BooleanOptionalAction, default=None, help="run the seed server (default: not in smoke)"
    )
    parser.add_argument("--no-ceilings", action="store_true", help="skip the relay and SSE ceilings")
    parser.add_argument("--only", help="run only these parts, comma-separated: relay,sse,server,paced,step,idle,seed")
    parser.add_argument("--profile", type=Path, help="py-spy the server during one extra 64-stream burst; write stacks here")
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "latest.json", help="JSON results (default benchmarks/results/latest.json)"
    )
    parser.add_argument("--markdown", type=Path, help="also write the summary table as Markdown here")
    parser.add_argument("--plot", type=Path, help="also write a PNG plot here (needs matplotlib)")
    parser.add_argument(
        "--server-src", type=Path, help="import openai_stream_server from this directory instead (A/B against an older commit)"
    )
    parser.add_argument("--render", type=Path, help="run nothing: print the table (and --markdown, --plot) of this JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (dataflow logs)")
    args = parser.parse_args(argv)
    if args.render:
        document = json.loads(args.render.read_text())
        print(report.table(document))
        if args.markdown:
            args.markdown.write_text(report.markdown(document, document.get("command", "python -m benchmarks.run")))
        if args.plot:
            report.plot(document, args.plot)
        return 0
    raise_open_files_limit()
    mode = MODES[args.mode]
    if args.levels:
        mode = replace(mode, levels=tuple(int(c) for c in args.levels.split(",")))
    if args.seed is None:
        args.seed = args.mode != "smoke"
    bin_path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    if args.seed and (importlib.util.find_spec("dora_openai_server") is None or shutil.which("dora-echo", path=bin_path) is None):
        log("the seed comparison needs dora-openai-server 0.5.0, dora-echo 0.5.0 and fastapi (see benchmarks/README.md): skipped")
        args.seed = False

    workdir = Path(tempfile.mkdtemp(prefix="oss-bench-"))
    log(f"benchmark: mode={args.mode} runs={args.runs} workdir={workdir}")
    runs = []
    ok = False
    try:
        for i in range(args.runs):
            log(f"run {i + 1}/{args.runs}")
            runs.append(Runner(mode, args, workdir).once())
        ok = True
    finally:
        if ok and not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            log(f"dataflow logs kept in {workdir}")

    summaries = [report.summarise(r, args.tokens_per_chunk) for r in runs]
    document = {
        "mode": args.mode,
        "config": {**asdict(mode), "tokens_per_chunk": args.tokens_per_chunk, "server_src": str(args.server_src or "")},
        "machine": machine(),
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(["python -m benchmarks.run", *(argv if argv is not None else sys.argv[1:])]),
        "runs": runs,
        "summaries": summaries,
        "median": report.medians(summaries),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=1))
    table = report.table(document)
    print(table)
    if args.markdown:
        args.markdown.write_text(report.markdown(document, document["command"]))
    if args.plot:
        report.plot(document, args.plot)
    log(f"results: {args.json}")
    exact = all(s["integrity_exact"] for s in summaries)
    if not exact:
        log("INTEGRITY FAILED: some stream lost, duplicated or crossed chunks (see the table)")
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
