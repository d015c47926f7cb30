"""CPU and memory of processes, read from ``/proc`` (Linux only)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of ``pid`` so far (``/proc/<pid>/stat`` fields 14 and 15)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds of each thread of ``pid``, by thread name (summed over threads of the same name)."""
    out: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            stat = (task / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / _TICK
    return out


def memory_kib(pid: int) -> tuple[int, int]:
    """``(VmRSS, VmHWM)`` of ``pid`` in KiB: resident now and its peak."""
    rss = hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            hwm = int(line.split()[1])
    return rss, hwm


def _ppid(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def descendants_matching(root: int, needle: str) -> list[int]:
    """PIDs below ``root`` (any depth) whose command line contains ``needle``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if needle not in cmdline:
                continue
            ancestor = pid
            for _ in range(64):  # bounded walk up the tree
                ancestor = _ppid(ancestor)
                if ancestor == root:
                    found.append(pid)
                    break
                if ancestor <= 1:
                    break
        except (OSError, ValueError):
            continue
    return sorted(found)


@dataclass(slots=True)
class CpuMeter:
    """CPU seconds used by ``pid`` between ``start()`` and ``stop()``."""

    pid: int
    started: float = 0.0
    used: float = 0.0

    def start(self) -> None:
        self.started = cpu_seconds(self.pid)

    def stop(self) -> float:
        self.used = cpu_seconds(self.pid) - self.started
        return self.used
