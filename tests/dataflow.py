"""Start and stop a real ``dora run`` dataflow for end-to-end tests and benchmarks.

The YAML is copied into a work directory with the server's port (and any
node's ``env:``) overridden, because node-level ``env:`` wins over the
environment of ``dora run``, and without ``build:`` lines, which ``dora run``
would otherwise run again relative to the copy. With ``port_from_environ`` the
port travels in the environment of ``dora run`` instead, as a user's
``OPENAI_STREAM_SERVER_PORT=9000 dora run ...`` would. Only the process group
started here is ever signalled.
"""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
SERVER_NODE = "openai-stream-server"
BIN_DIR = Path(sys.executable).parent


_PORTS = (20000, 32000)
"""Where ``free_port`` looks: below Linux's ephemeral range (32768-60999). A port the kernel hands out
for ``bind(0)`` is an ephemeral one, and in the seconds before the dataflow binds it an outgoing
connection of another test could take it (uvicorn then exits: "address already in use")."""


def free_port() -> int:
    """A port on 127.0.0.1 that is free now, outside the ephemeral range (at most 200 tries)."""
    for _ in range(200):
        port = random.randrange(*_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in {_PORTS} after 200 tries")


class Dataflow:
    """``with Dataflow(ROOT / "dataflow-stream.yml", tmp_path) as flow: flow.base_url ...``"""

    def __init__(
        self,
        yml: Path,
        workdir: Path,
        *,
        env: dict[str, dict[str, Any]] | None = None,
        extra_nodes: list[dict[str, Any]] | None = None,
        transform: Any = None,
        ready_timeout_s: float = 90.0,
        port_from_environ: bool = False,
    ) -> None:
        self.yml = yml
        self.workdir = workdir
        self.port = free_port()
        self.env = env or {}
        self.extra_nodes = extra_nodes or []
        self.transform = transform
        self.ready_timeout_s = ready_timeout_s
        self.port_from_environ = port_from_environ
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / "dora-run.log"
        self.start_attempts = 1

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def descriptor(self) -> dict[str, Any]:
        spec = yaml.safe_load(self.yml.read_text())
        spec["nodes"].extend(self.extra_nodes)
        for node in spec["nodes"]:
            # `dora run` runs `build:` first, relative to the YAML; the venv already has everything.
            node.pop("build", None)
            node_env = node.setdefault("env", {}) or {}
            node["env"] = node_env
            if node["id"] == SERVER_NODE and not self.port_from_environ:
                node_env["OPENAI_STREAM_SERVER_PORT"] = self.port
            if node["id"] == SERVER_NODE:
                # The shipped YAMLs keep completions in SQLite (docs/store.md); a test that does not ask for a
                # store keeps them in memory, so that no test reads another's records from the user's file.
                node_env["OPENAI_STREAM_SERVER_STORE"] = "memory"
            node_env.update(self.env.get(node["id"], {}))
            if isinstance(node.get("path"), str) and node["path"].endswith(".py") and not os.path.isabs(node["path"]):
                node["path"] = str((self.yml.parent / node["path"]).resolve())
        if self.transform is not None:
            spec = self.transform(spec)
        return spec

    def start(self) -> Dataflow:
        self.workdir.mkdir(parents=True, exist_ok=True)
        path = self.workdir / "dataflow.yml"
        path.write_text(yaml.safe_dump(self.descriptor(), sort_keys=False))
        env = {**os.environ, "PATH": f"{BIN_DIR}{os.pathsep}{os.environ.get('PATH', '')}", "PYTHONUNBUFFERED": "1"}
        if self.port_from_environ:
            env["OPENAI_STREAM_SERVER_PORT"] = str(self.port)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [str(BIN_DIR / "dora"), "run", str(path)],
                cwd=self.workdir,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            self.wait_ready()
        except RuntimeError:
            if self.start_attempts >= 3 or "address already in use" not in self.log_path.read_text(errors="replace"):
                raise
            self.stop()  # someone took the port meanwhile: once more on another
            self.start_attempts += 1
            self.port = free_port()
            return self.start()
        return self

    def wait_ready(self) -> None:
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"dora run exited with {self.process.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.base_url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the dataflow did not become ready in {self.ready_timeout_s} s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def node_pids(self) -> dict[int, str]:
        """The node processes ``dora run`` spawned (its children: dora puts each in a session of its own)."""
        if self.process is None:
            return {}
        pids = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                if ppid == self.process.pid:
                    pids[int(entry.name)] = (entry / "cmdline").read_bytes().decode(errors="replace")
            except (OSError, ValueError, IndexError):
                continue
        return pids

    def server_pid(self) -> int | None:
        """The pid of the openai-stream-server node process."""
        return next((pid for pid, cmd in self.node_pids().items() if "openai-stream-server" in cmd), None)

    def stop(self, timeout_s: float = 20.0) -> int | None:
        """SIGINT the process group (dora stops the nodes), then SIGKILL whatever is left of what it started."""
        process = self.process
        if process is None:
            return None
        nodes = self.node_pids()
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGINT)
                process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        try:
            os.killpg(process.pid, signal.SIGKILL)  # stragglers in the group, if any
        except ProcessLookupError:
            pass
        process.wait(5)
        for pid, cmdline in nodes.items():  # orphaned nodes: only those still running the same command
            try:
                if (Path("/proc") / str(pid) / "cmdline").read_bytes().decode(errors="replace") == cmdline:
                    os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        return process.returncode

    def __enter__(self) -> Dataflow:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
