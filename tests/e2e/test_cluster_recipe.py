"""docs/deploy.md's several-machines recipe, run as written: its commands, on loopback, with the shipped flow.

The commands come from the code block under the marker comment in docs/deploy.md, so the recipe a
user copies is the one tested. Only what one host needs changes: the documented address
``10.0.0.1`` becomes 127.0.0.1, the coordinator's, zenoh's and the server's ports free ones, and
each daemon gets its own ``--local-listen-port`` (the docs say so for one host). Each daemon runs
in a directory of its own holding a copy of ``zenoh-lossless.json5``, as on its own machine, so that
``"$PWD/zenoh-lossless.json5"`` is what it is for a user. ``dora build`` is the one command not run:
it reinstalls the repository's packages into the venv that ``make test`` already built.

Everything started here is stopped by pid (``tests/e2e/test_cluster.py``'s helpers).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from openai_stream_protocol.testing import wait_until_async
from tests.dataflow import BIN_DIR, ROOT, free_port
from tests.e2e.test_cluster import children_of, node_id_of

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MARKER = "<!-- tests/e2e/test_cluster_recipe.py runs the commands of the next block as written (on loopback) -->"
DOC_HOST = "10.0.0.1"


def recipe_commands(doc: str) -> list[str]:
    """The commands of the bash block after ``MARKER``: continuation lines joined, comments left out."""
    after = doc[doc.index(MARKER) + len(MARKER) :]
    block = re.search(r"```bash\n(.*?)```", after, re.S)
    assert block is not None, "no bash block after the marker"
    joined = block.group(1).replace("\\\n", " ")
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_recipe_block_is_what_the_test_expects() -> None:
    """The shape the loopback run below relies on: a failure here means the docs changed, and this test with them."""
    commands = recipe_commands((ROOT / "docs/deploy.md").read_text())
    kinds = [next(w for w in shlex.split(c) if w in ("coordinator", "daemon", "export", "build", "start")) for c in commands]
    assert kinds == ["coordinator", "daemon", "daemon", "export", "build", "start"]
    for daemon in commands[1:3]:
        assert '--zenoh-config-overlay "$PWD/zenoh-lossless.json5"' in daemon  # absolute where nodes run
    assert "dataflow-cluster.yml" in commands[-1] and "--detach" in commands[-1]


@dataclass
class Recipe:
    """The recipe's processes on loopback."""

    workdir: Path
    coordinator_port: int = field(default_factory=free_port)
    zenoh_port: int = field(default_factory=free_port)
    server_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    nodes: dict[int, bytes] = field(default_factory=dict)
    api_key: str = ""
    cli_env: dict[str, str] = field(default_factory=dict)
    name: str = ""

    def __post_init__(self) -> None:
        self.env = {
            **os.environ,
            "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}",  # the venv of `make run`, active
            "PYTHONUNBUFFERED": "1",
            "UV_NO_SYNC": "1",  # dora resolves `path:` with `uv run which` when uv is on PATH (Makefile)
            "XDG_STATE_HOME": str(self.workdir / "state"),  # the server's SQLite file, not the user's
        }
        for key in ("DORA_COORDINATOR_ADDR", "DORA_COORDINATOR_PORT"):
            self.env.pop(key, None)

    def on_loopback(self, command: str) -> str:
        """The documented command with loopback addresses and free ports."""
        command = command.replace(DOC_HOST, "127.0.0.1").replace("6013", str(self.coordinator_port))
        return command.replace(":7447", f":{self.zenoh_port}")

    def run(self, commands: list[str]) -> None:
        for command in commands:
            words = shlex.split(command)
            command = self.on_loopback(command)
            if "coordinator" in words:
                self._spawn("coordinator", command, self.workdir / "coordinator")
            elif "daemon" in words:
                machine = words[words.index("--machine-id") + 1]
                home = self.workdir / f"machine-{machine}"
                home.mkdir(parents=True)
                shutil.copy(ROOT / "zenoh-lossless.json5", home)  # each machine's clone of the repository
                command += f" --local-listen-port {free_port()}"
                if "OPENAI_STREAM_SERVER_HOST" in command:  # the server's machine: its port, and the key it needs
                    command = f"OPENAI_STREAM_SERVER_PORT={self.server_port} {command}"
                    self.api_key = re.search(r"OPENAI_STREAM_SERVER_API_KEY=(\S+)", command).group(1)  # type: ignore[union-attr]
                self._spawn(f"daemon-{machine}", command, home)
            elif words[0] == "export":
                self.cli_env.update(dict(w.split("=", 1) for w in shlex.split(command)[1:]))
            elif "build" in words:
                continue  # the venv `make test` built already holds what it installs
            elif "start" in words:
                self.name = words[words.index("--name") + 1]
                self._start(command)
            else:
                raise AssertionError(f"a command the test does not know: {command}")

    def _spawn(self, name: str, command: str, cwd: Path) -> None:
        cwd.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{name}.log").open("wb")
        self.processes[name] = subprocess.Popen(
            ["bash", "-c", command], cwd=cwd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def cli(self, command: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        """A CLI command from the repository, with the recipe's exported coordinator address."""
        env = {**self.env, **self.cli_env}
        return subprocess.run(["bash", "-c", command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout_s)

    def _start(self, command: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s  # again while the daemons register (bounded)
        while True:
            result = self.cli(command)
            if result.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{command} failed: {result.stdout}{result.stderr}\n{self.logs()}")
            time.sleep(1)

    def record_nodes(self) -> dict[int, bytes]:
        daemons = {p.pid for name, p in self.processes.items() if name.startswith("daemon-")}
        self.nodes.update(children_of(daemons))
        return self.nodes

    def pids(self) -> dict[str | None, int]:
        return {node_id_of(pid): pid for pid in self.record_nodes()}

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in sorted(self.workdir.glob("*.log")))

    def stop(self) -> None:
        self.record_nodes()
        if self.name:
            try:
                self.cli(f"dora stop --name {self.name}", timeout_s=30)
            except (subprocess.TimeoutExpired, OSError):
                pass
        for process in reversed(list(self.processes.values())):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(process.pid, sig)
                    process.wait(10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
        for pid, cmdline in self.nodes.items():  # in sessions of their own: still running after their daemon
            try:
                if Path(f"/proc/{pid}/cmdline").read_bytes() == cmdline:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture
def recipe(tmp_path: Path) -> Iterator[Recipe]:
    running = Recipe(tmp_path)
    try:
        running.run(recipe_commands((ROOT / "docs/deploy.md").read_text()))
        yield running
    finally:
        running.stop()


async def stream(client: httpx.AsyncClient, text: str) -> str:
    """The streamed answer's text; an error event fails it (no silent truncation)."""
    body = {"model": "m", "messages": [{"role": "user", "content": text}], "stream": True}
    out = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                if "error" in event:
                    return f"<error: {event['error'].get('code')}>"
                if event["choices"]:
                    out.append(event["choices"][0]["delta"].get("content") or "")
    return "".join(out)


def words(tag: str, i: int, n: int) -> str:
    return " ".join(f"{tag}{i}w{j}" for j in range(n))


def test_the_documented_recipe_serves_300_streams_exactly_and_survives_a_replica_restart_under_load(recipe: Recipe) -> None:
    base = f"http://127.0.0.1:{recipe.server_port}"
    headers = {"Authorization": f"Bearer {recipe.api_key}"}

    def healthy() -> bool:
        try:
            return httpx.get(base + "/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    asyncio.run(wait_until_async(healthy, timeout_s=120, interval_s=0.2, what=f"the server on {base}\n{recipe.logs()}"))
    pids = recipe.pids()
    assert {"openai-stream-server", "echo-stream-1", "echo-stream-2"} <= set(pids), (pids, recipe.logs())
    # Each node runs in its daemon's directory for the dataflow, not where the CLI ran: why the overlay is absolute.
    server_cwd = Path(f"/proc/{pids['openai-stream-server']}/cwd").resolve()
    assert server_cwd.is_relative_to(recipe.workdir / "machine-A") and "_work" in server_cwd.parts, server_cwd

    async def run() -> tuple[list[str], list[str], list[str], dict[str, Any], str]:
        # Idle connections expire here before the server's 5 s keep-alive closes them: a POST on a connection
        # the server is closing at that instant fails with ReadError (seen once under load) and is not retried.
        limits = httpx.Limits(max_connections=400, keepalive_expiry=2)
        async with httpx.AsyncClient(base_url=base, headers=headers, timeout=90, limits=limits) as client:
            prompts = [words("c", i, 20) for i in range(300)]
            texts = await asyncio.wait_for(asyncio.gather(*(stream(client, p) for p in prompts)), 120)
            # 100 streams of 60 tokens (about 1.2 s each in 20 ms steps); echo-stream-1 restarted while they stream.
            long = [words("r", i, 60) for i in range(100)]
            during = asyncio.gather(*(stream(client, p) for p in long))
            await wait_until_async(
                lambda: httpx.get(base + "/health", timeout=2).json()["active_streams"] >= 90, timeout_s=30, interval_s=0.05
            )
            restarted = recipe.cli(f"dora node restart echo-stream-1 --dataflow {recipe.name}")
            assert restarted.returncode == 0, restarted.stdout + restarted.stderr
            got = await asyncio.wait_for(during, 120)
            health = (await client.get("/health")).json()
            metrics = (await client.get("/metrics")).text
        return prompts, texts, [a if a == b else f"{b!r} != {a!r}" for a, b in zip(long, got, strict=True)], health, metrics

    prompts, texts, restart_results, health, metrics = asyncio.run(run())
    recipe.record_nodes()  # the restarted process too, so that it is stopped with the rest
    assert texts == prompts
    # Every stream whole: those on the other replica untouched, those on the restarted one continued elsewhere.
    wrong = [r for r in restart_results if " != " in r]
    assert wrong == [], f"{len(wrong)} of 100 streams not exact: {wrong[:3]}\n{recipe.logs()}"
    assert health["active_streams"] == 0
    assert {r["id"] for r in health["replicas"]} == {"echo-stream-1", "echo-stream-2"}
    assert "oss_resends_requested_total" in metrics
