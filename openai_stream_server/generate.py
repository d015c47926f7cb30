"""``openai-stream-server dataflow``: write a dataflow of N server processes and M replicas of a model node.

The multi-server layout (docs/architecture.md, "Several server processes") is N x M pairs of
outputs and inputs that nobody should write by hand: each server has a request and a cancel output
per replica and an answer input per replica; each replica has a request and a cancel input per
server and one chunk output per server. ``dataflow-frontdoor.yml`` is this command's output, and
a test checks that it still is (tests/unit/test_generate.py)::

    openai-stream-server dataflow --servers 2 --replicas 3 --store redis://127.0.0.1:6379/0 \\
        --node-env ECHO_TOKEN_DELAY_S=0.02 -o dataflow-frontdoor.yml

The YAML is written as text, in the shape of the shipped files (one flow mapping per input), so
that it reads like them and a diff of two runs is the change and nothing else.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from openai_stream_protocol import CANCEL_OUTPUT, REQUEST_OUTPUT

SERVER_PREFIX = "openai-stream-server"
QUEUE = "queue_size: 100000, queue_policy: backpressure"
"""Every request, chunk and cancel input is lossless (docs/architecture.md, "Queue settings and the tick input")."""
ECHO = "echo-stream"
ECHO_BUILD = "pip install -e protocol -e nodes/echo_stream"
SERVER_BUILD = "pip install -e protocol -e ."


@dataclass(frozen=True)
class Layout:
    """What to write: the servers, the replicas of one node, and the settings they get."""

    servers: int = 2
    replicas: int = 3
    node_path: str = ECHO
    """The replicas' ``path:`` (a console script, or a ``.py`` file)."""
    node_id: str = ""
    """The replicas' id prefix: ``<node_id>-1`` ... (empty: from the path)."""
    node_build: str | None = None
    """The replicas' ``build:`` (None: ``pip install -e protocol -e nodes/echo_stream`` for echo-stream, else none)."""
    node_env: tuple[tuple[str, str], ...] = ()
    chunk_output: str = "chunks"
    """The replicas' chunk output; each has one per server, ``<chunk_output>/<server id>``."""
    store: str = "redis://127.0.0.1:6379/0"
    """Every server's ``--store``: Redis, so that any server serves any completion (docs/store.md)."""
    server_env: tuple[tuple[str, str], ...] = ()
    port: int | None = None
    """Written into every server's env; None: the server's default (8000) or ``OPENAI_STREAM_SERVER_PORT`` of ``dora run``."""
    separate_ports: int | None = None
    """Server i listens on this port + i - 1, without ``--reuse-port``: one upstream each for a load balancer."""
    host: str | None = None
    restart_policy: str = "on-failure"
    command: list[str] = field(default_factory=list)
    """The command line, for the header."""

    @property
    def server_ids(self) -> list[str]:
        return [f"{SERVER_PREFIX}-{i}" for i in range(1, self.servers + 1)]

    @property
    def replica_ids(self) -> list[str]:
        prefix = self.node_id or Path(self.node_path).name.removesuffix(".py").replace("_", "-")
        return [f"{prefix}-{i}" for i in range(1, self.replicas + 1)]


def _quote(value: str) -> str:
    """A YAML scalar that reads back as the same string (plain where that is safe)."""
    plain = value and value.strip() == value and not any(c in value for c in ":#{}[],&*!|>'\"%@`") and value[0] not in "-?"
    if plain and value.lower() not in ("true", "false", "yes", "no", "on", "off", "null", "~"):
        try:
            float(value)
        except ValueError:
            return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(layout: Layout) -> str:
    if layout.servers < 1 or layout.replicas < 1:
        raise ValueError("at least one server and one replica")
    servers, replicas = layout.server_ids, layout.replica_ids
    out = layout.chunk_output
    build = layout.node_build if layout.node_build is not None else (ECHO_BUILD if layout.node_path == ECHO else "")
    lines = [
        f"# {layout.servers} server processes x {layout.replicas} replicas of {layout.node_path}, written by",
        "#",
        "#   " + shlex.join(["openai-stream-server", "dataflow", *layout.command]) + " -o <this file>",
        "#",
        '# docs/architecture.md, "Several server processes": each server has a request and a cancel output per replica and',
        f"# an answer input per replica; each replica answers each server on an output of its own ({out}/<server id>), so",
        "# no server receives another's chunks. Completions are shared through the store, so a reattach, a cancel, a GET",
        "# or a previous_response_id may reach any server. `restart_policy: on-failure` brings a killed process back.",
    ]
    if layout.separate_ports is None:
        lines += [
            "# The servers share one port (SO_REUSEPORT: the kernel spreads connections over them), the server's default",
            "# 8000, or OPENAI_STREAM_SERVER_PORT=9000 dora run ... for another.",
        ]
    else:
        last = layout.separate_ports + layout.servers - 1
        lines.append(f"# Server i listens on port {layout.separate_ports} + i - 1 (up to {last}): a load balancer goes in front.")
    lines.append("nodes:")
    for server in servers:
        lines += [
            f"  - id: {server}",
            f"    build: {SERVER_BUILD}",
            f"    path: {SERVER_PREFIX}",
            *_restarts(layout),
            "    inputs:",
        ]
        lines += [f"      {out}/{r}: {{source: {r}/{out}/{server}, {QUEUE}}}" for r in replicas]
        lines += ["      tick: dora/timer/millis/500", "    outputs:"]
        lines += [f"      - {o}/{r}" for r in replicas for o in (REQUEST_OUTPUT, CANCEL_OUTPUT)]
        env: list[tuple[str, str]] = []
        if layout.host is not None:
            env.append(("OPENAI_STREAM_SERVER_HOST", layout.host))
        if layout.separate_ports is not None:
            env.append(("OPENAI_STREAM_SERVER_PORT", str(layout.separate_ports + servers.index(server))))
        else:
            if layout.port is not None:
                env.append(("OPENAI_STREAM_SERVER_PORT", str(layout.port)))
            env.append(("OPENAI_STREAM_SERVER_REUSE_PORT", "true"))
        env.append(("OPENAI_STREAM_SERVER_STORE", layout.store))
        env += list(layout.server_env)
        lines += ["    env:", *(f"      {k}: {_quote(v)}" for k, v in env), ""]
    for replica in replicas:
        lines.append(f"  - id: {replica}")
        if build:
            lines.append(f"    build: {build}")
        lines += [f"    path: {layout.node_path}", *_restarts(layout), "    inputs:"]
        for server in servers:
            lines.append(f"      {REQUEST_OUTPUT}/{server}: {{source: {server}/{REQUEST_OUTPUT}/{replica}, {QUEUE}}}")
            lines.append(f"      {CANCEL_OUTPUT}/{server}: {{source: {server}/{CANCEL_OUTPUT}/{replica}, {QUEUE}}}")
        lines += ["    outputs:", *(f"      - {out}/{s}" for s in servers)]
        if layout.node_env:
            lines += ["    env:", *(f"      {k}: {_quote(v)}" for k, v in layout.node_env)]
        lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"


def _restarts(layout: Layout) -> list[str]:
    """A node's restart policy, bounded as the shipped dataflows bound it: a delay that doubles from 0.5 s to 10 s, at
    most 5 restarts a minute (docs/deploy.md), so that a node that cannot start (a port it cannot bind) stops trying."""
    lines = [f"    restart_policy: {layout.restart_policy}"]
    if layout.restart_policy != "never":
        lines += ["    max_restarts: 5", "    restart_window: 60.0", "    restart_delay: 0.5", "    max_restart_delay: 10.0"]
    return lines


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def parse(argv: Sequence[str]) -> tuple[Layout, str | None]:
    parser = argparse.ArgumentParser(
        prog="openai-stream-server dataflow",
        description="Write a dora dataflow of N server processes and M replicas of a model node "
        "(docs/architecture.md, 'Several server processes'); prints it, or writes it with -o.",
    )
    parser.add_argument("--servers", type=int, default=2, help="server processes (default 2)")
    parser.add_argument("--replicas", type=int, default=3, help="replicas of the model node (default 3)")
    parser.add_argument("--node", dest="node_path", default=ECHO, help="the model node's path: (default echo-stream)")
    parser.add_argument("--node-id", default="", help="the replicas' id prefix (default: from --node)")
    parser.add_argument("--node-build", default=None, help="the replicas' build: command (default: echo-stream's, else none)")
    parser.add_argument("--node-env", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--chunk-output", default="chunks", help="the model node's chunk output (default chunks)")
    parser.add_argument("--store", default="redis://127.0.0.1:6379/0", help="every server's --store (default: a local Redis)")
    parser.add_argument("--server-env", type=_pair, action="append", default=[], metavar="KEY=VALUE", help="repeatable")
    parser.add_argument("--port", type=int, default=None, help="the servers' one port (default: the server's, 8000)")
    parser.add_argument(
        "--separate-ports", type=int, default=None, metavar="FIRST", help="server i on FIRST + i - 1, for a load balancer"
    )
    parser.add_argument("--host", default=None, help="the servers' --host (default: the server's, 127.0.0.1)")
    parser.add_argument("--restart-policy", default="on-failure", help="every node's restart_policy (default on-failure)")
    parser.add_argument("-o", "--output", default=None, help="write here instead of printing")
    args = parser.parse_args(argv)
    if args.servers < 1 or args.replicas < 1:
        parser.error("--servers and --replicas must be at least 1")
    if args.port is not None and args.separate_ports is not None:
        parser.error("--port and --separate-ports exclude each other")
    command = list(argv)
    if args.output is not None:  # the header names the command without where it was written
        i = max(i for i, a in enumerate(command) if a in ("-o", "--output") or a.startswith("--output="))
        del command[i : i + (1 if "=" in command[i] else 2)]
    layout = Layout(
        servers=args.servers,
        replicas=args.replicas,
        node_path=args.node_path,
        node_id=args.node_id,
        node_build=args.node_build,
        node_env=tuple(args.node_env),
        chunk_output=args.chunk_output,
        store=args.store,
        server_env=tuple(args.server_env),
        port=args.port,
        separate_ports=args.separate_ports,
        host=args.host,
        restart_policy=args.restart_policy,
        command=command,
    )
    return layout, args.output


def main(argv: Sequence[str] | None = None) -> None:
    layout, output = parse(list(sys.argv[1:] if argv is None else argv))
    if layout.servers > 1 and not layout.store.startswith(("redis://", "rediss://")):
        sys.stderr.write(
            f"openai-stream-server dataflow: warning: --store {layout.store} is not shared: a reattach, cancel or GET "
            "that reaches another server process than the one that ran the completion gets 404\n"
        )
    text = render(layout)
    if output is None:
        sys.stdout.write(text)
    else:
        Path(output).write_text(text)
