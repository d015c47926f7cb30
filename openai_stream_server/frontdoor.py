"""Several server processes in one dataflow (docs/architecture.md, "Several server processes").

One Python process tops out near one core: ~26-30 us of CPU per SSE event, 35-40k events/s
(benchmarks/README.md, "Several server processes"). The front door scales by running N server
nodes, which share:

- **the port**: each binds it with ``SO_REUSEPORT`` (``--reuse-port``) before joining the dataflow
  and hands uvicorn the bound socket; the kernel spreads new connections over them. A server that
  cannot bind refuses to start with one line that says why (``listen_socket``);
- **the replicas**: a replica has one chunk output per server, ``<output>/<server node id>``; a
  request to such a replica names its server (``server`` in the metadata) so that the answer comes
  back on that server's output only (``per_server_replicas``; the protocol's ``_servers.py``);
- **the completions**: through the Redis store (docs/store.md), so that a reattach, a cancel, a GET
  or a ``previous_response_id`` may land on any of them;
- **the load**: every replica's heartbeat reaches every server, which routes on it
  (``replicas.Replica.routing_load``).

``ServerIdentity`` is which process answered: ``/health`` names it and ``/metrics`` has it as
``oss_server_info{server, host, pid}``.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from prometheus_client import Info

from .metrics import Metrics

DEFAULT_NAME = "openai-stream-server"
BACKLOG = 2048
"""uvicorn's default listen backlog."""


class BindError(Exception):
    """The server cannot listen where it was told: the message says why, in one line."""


def listen_socket(host: str, port: int, *, reuse_port: bool = False, platform: str = sys.platform) -> socket.socket:
    """A listening TCP socket on ``host:port``, bound before the server joins the dataflow.

    ``reuse_port``: with ``SO_REUSEPORT``, so that several server processes listen on one port and the
    kernel spreads connections over them (Linux only: elsewhere the option exists without the
    spreading, or not at all). ``BindError`` when the address is taken (by a process that did not set
    the option, or by anyone without it) or cannot be used.
    """
    if reuse_port and (not platform.startswith("linux") or not hasattr(socket, "SO_REUSEPORT")):
        raise BindError(
            f"--reuse-port needs Linux's SO_REUSEPORT, which spreads connections over the processes "
            f"sharing a port; this system ({platform}) has none: give each server process its own port"
        )
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: a restart reuses its port at once
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = (
                "a process that did not set SO_REUSEPORT listens there (every server sharing the port needs --reuse-port)"
                if reuse_port
                else "another process listens there (several server processes on one port need --reuse-port on each)"
            )
            raise BindError(f"cannot listen on {host}:{port}: address already in use: {why}") from None
        raise BindError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


@dataclass(frozen=True, slots=True)
class ServerIdentity:
    """Which server process this is: its name (the dora node id), host and pid."""

    name: str
    host: str
    pid: int

    @classmethod
    def here(cls, name: str = "") -> ServerIdentity:
        return cls(name or DEFAULT_NAME, socket.gethostname(), os.getpid())

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "host": self.host, "pid": self.pid}

    def export(self, metrics: Metrics) -> None:
        """``oss_server_info{server, host, pid} 1``: which process a scrape reached (the ``server`` label)."""
        info = Info("oss_server", "The server process that answered this scrape", registry=metrics.registry)
        info.info({"server": self.name, "host": self.host, "pid": str(self.pid)})


def per_server_replicas(config: Mapping[str, Any] | None, server: str) -> frozenset[str]:
    """The replicas (source node ids) that answer this server on an output of its own, ``<output>/<server>``.

    Read from the server node's inputs (``node.node_config()``): ``chunks/echo-1: {source: echo-1/chunks/srv-1}``
    makes ``echo-1`` one. Requests to them carry ``server``; to any other, nothing changes on the wire.
    """
    if not config or not server:
        return frozenset()
    found = set()
    for source in (config.get("inputs") or {}).values():
        name = source.get("source", "") if isinstance(source, dict) else str(source)
        node, _, output = name.partition("/")
        if node != "dora" and output.endswith("/" + server):
            found.add(node)
    return frozenset(found)


_PLACE = re.compile(r"-(\d+)$")


def server_place(server: str) -> int:
    """This server's place among several: K - 1 for an id ending in ``-K`` (the generator's), else a hash of the id.

    Servers break ties between equally loaded replicas from different places (``ReplicaSet.spread``): with the same
    heartbeat loads in view, servers deciding at the same moment would otherwise all pick the same replica.
    """
    match = _PLACE.search(server)
    return int(match.group(1)) - 1 if match else zlib.crc32(server.encode())
