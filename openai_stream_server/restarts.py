"""Which model replicas keep restarting: restarts per replica over the last minute, for ``/health`` and the log.

A replica whose process dies at once after each start (a setting it cannot read, a model that does not
load) is restarted by dora's restart policy again and again; the shipped flows bound that
(``max_restarts``, ``restart_delay``: docs/deploy.md, "Several machines"), but until dora gives up,
and across machines where the server hears only the new process's hello, the server is the one place
that sees it as a pattern. The bridge notes each restart it hears of (``NODE_RESTARTED``, the hello of
a new process); ``/health`` names a replica with ``STORM_RESTARTS`` or more in the last minute under
``restarting``, and the log says so once a minute per replica.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
STORM_RESTARTS = 3
"""Restarts within ``WINDOW_S`` that make a replica one that keeps restarting."""


class RestartLog:
    """Restart times per replica id over the last ``WINDOW_S``; on the event loop only."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._times: dict[str, deque[float]] = {}
        self._warned_at: dict[str, float] = {}

    def note(self, replica_id: str) -> None:
        now = self.clock()
        times = self._times.setdefault(replica_id, deque())
        times.append(now)
        self._trim(times, now)
        if len(times) >= STORM_RESTARTS:
            warned = self._warned_at.get(replica_id)
            if warned is None or now - warned >= WINDOW_S:
                self._warned_at[replica_id] = now
                logger.error(
                    "model replica %r restarted %d times in the last minute: it keeps failing (read its log); "
                    "dora stops restarting it after the node's max_restarts (docs/deploy.md, \"Several machines\")",
                    replica_id,
                    len(times),
                )

    def last_minute(self, replica_id: str) -> int:
        times = self._times.get(replica_id)
        if not times:
            return 0
        self._trim(times, self.clock())
        return len(times)

    def restarting(self) -> list[str]:
        """The replicas with ``STORM_RESTARTS`` or more restarts in the last minute."""
        return sorted(rid for rid in self._times if self.last_minute(rid) >= STORM_RESTARTS)

    def annotate(self, health: dict[str, Any]) -> None:
        """Add ``restarts_last_minute`` to each replica row of a ``/health`` body, and ``restarting`` when any is."""
        for row in health.get("replicas") or ():
            row["restarts_last_minute"] = self.last_minute(str(row.get("id")))
        restarting = self.restarting()
        if restarting:
            health["restarting"] = restarting

    @staticmethod
    def _trim(times: deque[float], now: float) -> None:
        while times and now - times[0] > WINDOW_S:
            times.popleft()
