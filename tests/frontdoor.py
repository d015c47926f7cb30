"""A dataflow of several server processes for end-to-end tests and benchmarks, written by the generator.

``FrontDoorFlow`` writes ``openai-stream-server dataflow`` output into its work directory and runs
it with ``tests.dataflow.Dataflow``: every server on one port (``SO_REUSEPORT``, the port in the
environment of ``dora run``), or each on its own (``separate_ports``, for a load balancer in front).
``which`` finds the server process a connection reached (``/health`` names it); ``node_pid`` the
process of a node by its id.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from openai_stream_server.generate import parse, render
from tests.dataflow import Dataflow, free_port


def free_ports(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now (at most 200 tries)."""
    for _ in range(200):
        first = free_port()
        sockets: list[socket.socket] = []
        try:
            for port in range(first, first + n):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return first
    raise RuntimeError(f"no {n} consecutive free ports after 200 tries")


class FrontDoorFlow(Dataflow):
    """``servers`` x ``replicas`` from the generator, with ``store`` (a Redis URL) and the replicas' ``node_env``."""

    def __init__(
        self,
        workdir: Path,
        store: str,
        *,
        servers: int = 2,
        replicas: int = 3,
        node_env: dict[str, Any] | None = None,
        server_env: dict[str, Any] | None = None,
        separate_ports: bool = False,
        extra_args: Sequence[str] = (),
        ready_timeout_s: float = 120.0,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.servers = [f"openai-stream-server-{i}" for i in range(1, servers + 1)]
        self.replicas = [f"echo-stream-{i}" for i in range(1, replicas + 1)]
        self.first_port = free_ports(servers) if separate_ports else None
        args = ["--servers", str(servers), "--replicas", str(replicas), "--store", store, *extra_args]
        for key, value in (node_env or {}).items():
            args += ["--node-env", f"{key}={value}"]
        for key, value in (server_env or {}).items():
            args += ["--server-env", f"{key}={value}"]
        if self.first_port is not None:
            args += ["--separate-ports", str(self.first_port)]
        layout, _ = parse(args)
        yml = workdir / "frontdoor.yml"
        yml.write_text(render(layout))
        super().__init__(yml, workdir, ready_timeout_s=ready_timeout_s, port_from_environ=self.first_port is None)
        if self.first_port is not None:
            self.port = self.first_port

    @property
    def urls(self) -> list[str]:
        """Each server's own URL (separate ports); with one shared port, that port once per server."""
        if self.first_port is None:
            return [self.base_url] * len(self.servers)
        return [f"http://127.0.0.1:{self.first_port + i}" for i in range(len(self.servers))]

    def wait_ready(self) -> None:
        """Every server answers /health (on one port: until new connections have reached each of them)."""
        deadline = time.monotonic() + self.ready_timeout_s
        seen: set[str] = set()
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"dora run exited with {self.process.returncode}:\n{self.log()}")
            for url in dict.fromkeys(self.urls):
                try:
                    response = httpx.get(url + "/health", timeout=1)  # a new connection each time
                except httpx.HTTPError:
                    continue
                if response.status_code == 200:
                    seen.add(response.json()["server"]["name"])
            if seen >= set(self.servers):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"not every server answered in {self.ready_timeout_s} s (saw {sorted(seen)}):\n{self.log()}")

    def which(self, url: str | None = None, timeout_s: float = 5.0) -> str:
        """The server process a new connection to ``url`` reaches."""
        response = httpx.get((url or self.base_url) + "/health", timeout=timeout_s)
        return str(response.json()["server"]["name"])

    def answering(self, attempts: int = 40) -> set[str]:
        """The servers that new connections reach (``attempts`` of them)."""
        seen: set[str] = set()
        for _ in range(attempts):
            for url in dict.fromkeys(self.urls):
                try:
                    seen.add(self.which(url, timeout_s=2))
                except (httpx.HTTPError, KeyError, ValueError):
                    continue
        return seen

    def scrape_each(self, attempts: int = 200) -> dict[str, str]:
        """``/metrics`` of every server (name -> text), over new connections until each has answered one."""
        scraped: dict[str, str] = {}
        for _ in range(attempts):
            for url in dict.fromkeys(self.urls):
                text = httpx.get(url + "/metrics", timeout=5).text
                for line in text.splitlines():
                    if line.startswith("oss_server_info{"):
                        scraped[line.split('server="', 1)[1].split('"', 1)[0]] = text
            if set(scraped) >= set(self.servers):
                return scraped
        raise AssertionError(f"only {sorted(scraped)} answered /metrics in {attempts} tries")

    def node_pid(self, node_id: str) -> int | None:
        """The pid of the process dora started for ``node_id`` (its ``DORA_NODE_CONFIG`` has ``node_id: <id>``)."""
        for pid in self.node_pids():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes()
            except OSError:
                continue
            if f"node_id: {node_id}\n".encode() in environ:
                return pid
        return None

    def node_log(self, node_id: str) -> str:
        """What dora logged of one node (its lines in ``dora run``'s output)."""
        return "\n".join(line for line in self.log_path.read_text(errors="replace").splitlines() if f" {node_id}:" in line)
