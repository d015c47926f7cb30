"""The processes a benchmark run starts, each stopped by the run that started it.

``tests.dataflow.Dataflow`` starts ``dora run`` on a copy of a YAML in its
own process group and signals only that group; ``BenchFlow`` adds a
readiness path (or none, for a dataflow that ends by itself) and finds the
node processes below it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.dataflow import ROOT, Dataflow, free_port

from .procs import descendants_matching

DATAFLOWS = Path(__file__).resolve().parent / "dataflows"
SERVER = "openai-stream-server"
ECHO = "echo-stream"


def http_ok(url: str, timeout_s: float = 1.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 (127.0.0.1 only)
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


class BenchFlow(Dataflow):
    """A benchmark dataflow; ``ready_path=None`` for one that runs to completion on its own."""

    def __init__(self, yml: Path, workdir: Path, *, ready_path: str | None = "/health", **kwargs: Any) -> None:
        super().__init__(yml, workdir, **kwargs)
        self.ready_path = ready_path

    def start(self) -> BenchFlow:
        """Start, trying twice more on a fresh port if the first start fails (another process may take the port)."""
        for attempt in range(3):
            try:
                super().start()
                return self
            except RuntimeError:
                self.stop()
                if attempt == 2:
                    raise
                self.port = free_port()
        return self

    def __enter__(self) -> BenchFlow:
        return self.start()

    def wait_ready(self) -> None:
        if self.ready_path is None:
            return
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"dora run exited with {self.process.returncode}:\n{self.log()}")
            if http_ok(self.base_url + self.ready_path):
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the dataflow did not become ready in {self.ready_timeout_s} s:\n{self.log()}")

    def node_pid(self, needle: str, timeout_s: float = 10.0) -> int:
        """The PID of the node process below this ``dora run`` whose command line contains ``needle``."""
        assert self.process is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            pids = descendants_matching(self.process.pid, needle)
            if pids:
                return pids[0]
            time.sleep(0.1)
        raise RuntimeError(f"no process matching {needle!r} below dora run (pid {self.process.pid})")

    @property
    def daemon_pid(self) -> int | None:
        """``dora run`` itself: the coordinator and the daemon that routes every message."""
        return None if self.process is None else self.process.pid

    def wait_exit(self, timeout_s: float) -> int | None:
        assert self.process is not None
        try:
            return self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return None


class SseCeiling:
    """``python -m benchmarks.sse_ceiling`` on a free port, in its own process group."""

    def __init__(self, workdir: Path, *, step_ms: float = 0.0) -> None:
        self.port = free_port()
        self.log_path = workdir / "sse-ceiling.log"
        self.process: subprocess.Popen[bytes] | None = None
        self.step_ms = step_ms
        """Above 0: every stream paced by one step clock (``sse_ceiling.py --step-ms``)."""

    def __enter__(self) -> SseCeiling:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.sse_ceiling", "--port", str(self.port), "--step-ms", str(self.step_ms)],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"sse_ceiling exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            if http_ok(f"http://127.0.0.1:{self.port}/"):
                return self
            time.sleep(0.1)
        self.__exit__()
        raise RuntimeError("sse_ceiling did not start in 30 s")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def __exit__(self, *exc: object) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
