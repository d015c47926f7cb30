"""A real nginx for tests: ``docs/nginx.conf`` with its ports rewritten, in its own temp dir, stopped by PID.

Debian's package (``apt-get install nginx``; ``.ci/run`` installs it). The shipped file is the
``upstream`` and ``server`` blocks of an ``http`` block; this wraps it in a top-level config that a
user without root can run (``daemon off``, pid file, logs and temp paths under the directory).
Missing binary: the test skips, or fails under CI (``tests/requirements.py``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.dataflow import ROOT, free_port
from tests.requirements import missing

NGINX = "/usr/sbin/nginx"
SHIPPED = ROOT / "docs" / "nginx.conf"


def nginx_binary() -> str:
    found = shutil.which("nginx") or (NGINX if Path(NGINX).exists() else None)
    if found is None:
        missing("nginx is not installed (apt-get install nginx)")
    return found


def site_config(upstreams: Sequence[int], port: int, shipped: str | None = None) -> str:
    """The shipped site with ``upstreams`` (ports on 127.0.0.1) as its servers and ``127.0.0.1:port`` to listen on."""
    text = SHIPPED.read_text() if shipped is None else shipped
    lines = re.findall(r"^ *server 127\.0\.0\.1:\d+.*;$", text, re.MULTILINE)
    assert len(lines) >= 1, "docs/nginx.conf names no upstream server"
    indent = lines[0][: len(lines[0]) - len(lines[0].lstrip())]
    options = lines[0].split(";")[0].split(maxsplit=2)[2:]  # max_fails=... fail_timeout=...
    servers = "\n".join(f"{indent}server 127.0.0.1:{p} {' '.join(options)};".replace(" ;", ";") for p in upstreams)
    text = text.replace("\n".join(lines), servers)
    text, listens = re.subn(r"^( *)listen \d+;$", rf"\1listen 127.0.0.1:{port};", text, flags=re.MULTILINE)
    assert listens == 1, "docs/nginx.conf has no single `listen <port>;`"
    return text


class NginxServer:
    """nginx in front of ``upstreams``, listening on a free port of 127.0.0.1."""

    def __init__(self, directory: Path, upstreams: Sequence[int]) -> None:
        self.binary = nginx_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.upstreams = list(upstreams)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> Path:
        d = self.directory
        (d / "site.conf").write_text(site_config(self.upstreams, self.port))
        temp = "\n".join(f"    {kind}_temp_path {d / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
        main = f"""daemon off;
pid {d / "nginx.pid"};
error_log {d / "error.log"} info;
worker_processes 1;
events {{ worker_connections 4096; }}
http {{
    log_format upstream '$request $status $upstream_addr';
    access_log {d / "access.log"} upstream;
{temp}
    include {d / "site.conf"};
}}
"""
        path = d / "nginx.conf"
        path.write_text(main)
        return path

    def start(self, timeout_s: float = 15.0) -> None:
        config = self.write_config()
        check = subprocess.run(
            [self.binary, "-t", "-p", str(self.directory), "-e", str(self.directory / "error.log"), "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        if check.returncode != 0:
            raise RuntimeError(f"nginx -t refused the config:\n{check.stderr}")
        self.process = subprocess.Popen(
            [self.binary, "-p", str(self.directory), "-e", str(self.directory / "error.log"), "-c", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=(self.directory / "stderr.log").open("wb"),
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.process.returncode}:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"nginx did not listen on {self.port} within {timeout_s} s:\n{self.log()}") from None
                time.sleep(0.05)

    def upstreams_of(self, needle: str) -> set[str]:
        """The upstream addresses (``127.0.0.1:port``) of the logged requests whose line contains ``needle``."""
        path = self.directory / "access.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return {line.rsplit(" ", 1)[-1] for line in lines if needle in line}

    def log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGQUIT)  # graceful: finish what is in flight
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # the master and its worker: the group started here
            process.wait(10)

    def __enter__(self) -> NginxServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
