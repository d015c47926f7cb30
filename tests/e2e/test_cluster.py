"""Several machines on one host: a coordinator, two daemons (machine ids A and B), ``dora start``.

``dataflow-cluster.yml`` (server on A, two echo_stream replicas on B), copied without its build
lines (the venv has everything), its replicas in per-token mode and losing chunk messages on
purpose: what they lose comes back through resends (docs/architecture.md, "Resend"). The recipe
as documented (step batches, 300 streams, a restart under load) is ``test_cluster_recipe.py``.
Ports are free ones on 127.0.0.1, the daemons find each other
through ``--zenoh-peer`` (no multicast here). Everything started here is stopped by pid: the
coordinator's and daemons' process groups, and the node processes the daemons spawned (in sessions
of their own, so stopping a daemon leaves them running).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from openai_stream_protocol.testing import wait_until_async
from tests.dataflow import BIN_DIR, ROOT, free_port
from tests.live import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def children_of(pids: set[int]) -> dict[int, bytes]:
    """Direct children of ``pids``, with their command lines (to kill only what is still the same process)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) in pids:
                found[int(entry.name)] = (entry / "cmdline").read_bytes()
        except (OSError, ValueError, IndexError):
            continue
    return found


def node_id_of(pid: int) -> str | None:
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    for item in environ.split(b"\0"):
        if item.startswith(b"DORA_NODE_CONFIG="):
            for line in item.decode(errors="replace").splitlines():
                if line.startswith("node_id: "):
                    return line.split(": ", 1)[1].strip()
    return None


class Cluster:
    """A coordinator and one daemon per machine id, on loopback, started and stopped by pid."""

    def __init__(self, workdir: Path, machines: dict[str, dict[str, str]]) -> None:
        self.workdir = workdir
        self.machines = machines
        self.coordinator_port = free_port()
        self.zenoh_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.nodes: dict[int, bytes] = {}
        self.env = {
            **os.environ,
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "UV_NO_SYNC": "1",  # dora resolves `path:` with `uv run which` when uv is on PATH (Makefile)
            "DORA_COORDINATOR_PORT": str(self.coordinator_port),
        }

    def _spawn(self, name: str, args: list[str], env: dict[str, str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            [str(BIN_DIR / "dora"), *args],
            cwd=self.workdir,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def start(self) -> Cluster:
        self._spawn("coordinator", ["coordinator", "--port", str(self.coordinator_port), "--store", "memory"], self.env)
        for machine, extra in self.machines.items():
            args = ["daemon", "--machine-id", machine, "--local-listen-port", str(free_port())]
            args += ["--coordinator-port", str(self.coordinator_port), "--zenoh-peer", f"tcp/127.0.0.1:{self.zenoh_port}"]
            args += ["--zenoh-config-overlay", str(ROOT / "zenoh-lossless.json5")]
            self._spawn(f"daemon-{machine}", args, {**self.env, **extra})
        return self

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN_DIR / "dora"), *args], cwd=self.workdir, env=self.env, capture_output=True, text=True, timeout=timeout_s
        )

    def dora_start(self, yml: Path, name: str, timeout_s: float = 60) -> None:
        """``dora start --detach``, again while the daemons are still registering (bounded)."""
        deadline = time.monotonic() + timeout_s
        while True:
            result = self.cli("start", str(yml), "--name", name, "--detach")
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"dora start failed: {result.stdout}{result.stderr}\n{self.logs()}")
            time.sleep(1)

    def record_nodes(self) -> dict[int, bytes]:
        """The node processes the daemons spawned so far (children of the daemon pids)."""
        daemons = {p.pid for name, p in self.processes.items() if name.startswith("daemon-")}
        self.nodes.update(children_of(daemons))
        return self.nodes

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    def stop(self) -> None:
        self.record_nodes()
        try:
            self.cli("stop", "--name", "cluster-test", timeout_s=30)
        except (subprocess.TimeoutExpired, OSError):
            pass
        for process in reversed(list(self.processes.values())):  # daemons first, the coordinator last
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGTERM)
                    process.wait(10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    pass
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait(5)
        for pid, cmdline in self.nodes.items():  # in sessions of their own: still running after their daemon
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[tuple[Cluster, int]]:
    port = free_port()
    # Under `dora start` nodes inherit their daemon's environment: the server's port goes to A's daemon.
    machines = {"A": {"OPENAI_STREAM_SERVER_PORT": str(port)}, "B": {"ECHO_LOG_LEVEL": "INFO"}}
    with Cluster(tmp_path, machines) as c:
        yield c, port


def body(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "stream": True}


async def stream_text(client: httpx.AsyncClient, text: str) -> str:
    out = []
    async with client.stream("POST", "/v1/chat/completions", json=body(text)) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["choices"]:
                    out.append(event["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def per_token_with_losses(spec: dict[str, Any]) -> dict[str, Any]:
    """``dataflow-cluster.yml`` with its replicas in per-token mode, each losing every ``DROP_EVERY``-th chunk message."""
    for node in spec["nodes"]:
        node.pop("build", None)  # `dora build` already happened: the venv has everything
        if node["id"] == "openai-stream-server":  # not the user's SQLite file (docs/store.md): nothing outlives the test
            node["env"]["OPENAI_STREAM_SERVER_STORE"] = "memory"
        else:
            node["env"] = {"ECHO_TOKEN_DELAY_S": TOKEN_DELAY_S, "ECHO_DROP_EVERY": str(DROP_EVERY)}
    return spec


DROP_EVERY = 37
TOKEN_DELAY_S = "0.1"
"""Per-token messages from machine B at ~2,000 a second for 200 streams: under the rate at which dora 1.1's
publish channel between daemons overflows (docs/deploy.md, "Step batches across machines: the cliff"), so
that what is lost is what the replicas drop on purpose."""


def test_two_daemons_per_token_streams_that_lose_chunks_come_back_whole_through_resends(cluster: tuple[Cluster, int]) -> None:
    c, port = cluster
    spec = per_token_with_losses(yaml.safe_load((ROOT / "dataflow-cluster.yml").read_text()))
    yml = c.workdir / "dataflow.yml"
    yml.write_text(yaml.safe_dump(spec, sort_keys=False))
    c.dora_start(yml, "cluster-test")
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    asyncio.run(wait_until_async(healthy, timeout_s=90, interval_s=0.2, what=f"the server on {base}\n{c.logs()}"))
    nodes = {node_id_of(pid): pid for pid in c.record_nodes()}
    assert {"openai-stream-server", "echo-stream-1", "echo-stream-2"} <= set(nodes), (nodes, c.logs())
    prompts = [" ".join(f"c{i}w{j}" for j in range(30)) for i in range(200)]

    async def run() -> tuple[list[str], dict[str, Any], str]:
        async with httpx.AsyncClient(base_url=base, timeout=60, limits=httpx.Limits(max_connections=210)) as client:
            texts = await asyncio.wait_for(asyncio.gather(*(stream_text(client, p) for p in prompts)), 120)
            return texts, (await client.get("/health")).json(), (await client.get("/metrics")).text

    texts, health, metrics = asyncio.run(run())
    assert texts == prompts
    assert health["active_streams"] == 0 and sum(r["served"] for r in health["replicas"]) == 200
    assert metric(metrics, "oss_resends_served_total") >= 200 * 31 // DROP_EVERY // 2  # about one hole per stream
    assert metric(metrics, "oss_resends_failed_total") == 0
    assert health["chunk_loss"]["gaps_last_minute"] >= 1 and health["status"] == "degraded"
