"""A real ``redis-server`` for tests: its own port on 127.0.0.1, its own temp dir, stopped by PID.

Debian's package (``apt-get install redis-server``; ``.ci/run`` installs it). Nothing is saved to
disk (``--save "" --appendonly no``), so a restart on the same port starts empty, as a Redis that
was lost and came back would. Missing binary: the test skips, or fails under CI
(``tests/requirements.py``).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from tests.requirements import missing

REDIS_SERVER = "/usr/bin/redis-server"


def redis_server_binary() -> str:
    found = shutil.which("redis-server") or (REDIS_SERVER if Path(REDIS_SERVER).exists() else None)
    if found is None:
        missing("redis-server is not installed (apt-get install redis-server)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def ping(port: int, timeout_s: float = 0.5) -> bool:
    """Whether a Redis answers PING on 127.0.0.1:``port``."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; ``stop`` / ``kill`` and ``start`` again keep the port."""

    def __init__(self, directory: Path, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout_s: float = 15.0) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        log = self.directory / "redis.log"
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--dir", str(self.directory),
                "--logfile", str(log),
                "--daemonize", "no",
            ],  # fmt: skip
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout_s
        while not ping(self.port):
            if self.process.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server exited with {self.process.returncode} on port {self.port}:\n{tail}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"redis-server did not answer PING on port {self.port} within {timeout_s} s")
            time.sleep(0.05)

    def _signal(self, sig: signal.Signals, timeout_s: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(sig)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout_s)

    def stop(self) -> None:
        """SIGTERM (redis saves nothing: ``--save ""``) and wait."""
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: Redis lost at once, connections reset."""
        self._signal(signal.SIGKILL)


@contextlib.contextmanager
def running_redis(directory: Path) -> Iterator[RedisServer]:
    server = RedisServer(directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()
