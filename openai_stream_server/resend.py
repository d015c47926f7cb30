"""Asking replicas for chunks lost on the way, and saying so when chunks are being lost.

docs/architecture.md, "Resend". A missing ``seq`` (a later chunk came, the one before it did not)
used to end its stream when the gap timeout passed. Between machines dora drops messages once a
daemon's publish channel is full (docs/architecture.md, "Facts measured"), so a hole is usually a
lost message, not a late one: every sweep, ``Resender`` finds each stream with a hole and asks the
replica that holds it to send the range again (``resend/<replica>``), a bounded number of times,
well before the gap timeout. A lost *last* chunk leaves no hole, only silence: a stream that went
quiet for ``TAIL_IDLE_S`` (or ten times its own pace, when slower) is asked for everything after
what it has. A replica that did not say ``can_resend`` is never asked, and its streams keep the
behaviour before resends (the gap timeout ends them).

Counted per hole (``oss_resends_*``): requested (each ask sent), served (a hole that filled after
an ask), failed (a hole that ended its stream after an ask: the node no longer held the range, or
the gap or idle timeout passed).

Loss itself (holes seen, resends failed, per replica, over the last minute) goes to ``/health``
(``chunk_loss``) and, at most once a minute, to one warning that names the likely cause.

Requests can be lost between machines too: the replica never had them, stays idle and sends no
heartbeats, so the server judges it silent (docs/architecture.md, "Failover") and, with nothing more
from it, would keep it down. Once a second each silent replica that takes asks is asked about a
request nobody holds; its ``resend_missed`` answer is a word from it, which brings it back.

Runs on the event loop only, once per sweep: nothing on the chunk path.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from openai_stream_protocol import REQUEST_OUTPUT, RESEND_OUTPUT

from .errors import UpstreamError
from .metrics import Metrics
from .replicas import Replica
from .state import Status, StreamState

if TYPE_CHECKING:
    from .registry import StreamRegistry

logger = logging.getLogger(__name__)

MAX_RESEND_ASKS = 3
"""Asks per hole at most: an ask or its answer may be lost too, so one is not enough; the gap timeout still bounds the wait."""
RESEND_AFTER_S = 0.2
"""How old a hole is before the first ask: chunks of one input arrive in order, so a hole is a loss, not a race."""
RESEND_INTERVAL_S = 1.0
"""Between two asks for the same hole, at most (less when the gap timeout is short: it fits ``MAX_RESEND_ASKS`` asks)."""
TAIL_IDLE_S = 1.0
"""A stream quiet this long after its chunks flowed (and ten times its own pace) may have lost its last chunk: ask for it."""
TAIL_PACE_FACTOR = 10.0
PROBE_INTERVAL_S = 1.0
"""How often a replica judged silent is asked whether it is there (``probe_silent``): requests lost on the way to
it leave it idle, and an idle replica sends no heartbeats to come back with."""
LOSS_WINDOW_S = 60.0
"""What ``/health`` reports of chunk loss: holes and failed resends in this last stretch."""
LOSS_LOG_INTERVAL_S = 60.0
"""The warning that chunks are being lost is written at most this often."""


class ResendBackend(Protocol):
    """What the resender needs of the backend (the dora bridge): who holds a request, and sending an ask there."""

    def replica_of(self, request_id: str) -> str | None: ...

    def ask_resend(self, request_id: str, first: int, end: int | None) -> bool:
        """Send the ask to the replica holding ``request_id``; False when it cannot take asks (then it is not asked again)."""

    def probe_silent(self) -> int:
        """Ask each replica judged silent about a request it cannot hold: its answer brings it back."""


@dataclass(slots=True)
class _Hole:
    """A stream's missing range, and the asks for it so far."""

    wire_id: str
    first: int
    end: int | None
    """None: a tail ask (everything from ``first`` on)."""
    since: float
    replica: str | None
    asks: int = 0
    last_ask_at: float | None = None
    unsupported: bool = False
    """Its replica takes no asks: the hole is left to the gap timeout, as before resends."""


class Resender:
    """Finds holes once per sweep, asks for them, counts the outcome, and keeps the recent loss for ``/health``."""

    def __init__(
        self, registry: StreamRegistry, backend: ResendBackend | None, metrics: Metrics, *, gap_timeout_s: float
    ) -> None:
        self.registry = registry
        self.backend = backend
        """None: the backend takes no asks (a test fake): holes are only reported."""
        self.interval_s = min(RESEND_INTERVAL_S, gap_timeout_s / (MAX_RESEND_ASKS + 1))
        self.holes: dict[str, _Hole] = {}
        """Completion id -> its open hole."""
        self.requested = 0
        self.served = 0
        self.failed = 0
        self._losses: deque[tuple[float, str, str | None]] = deque()
        """``(when, "gap" | "failed", replica)`` over the last ``LOSS_WINDOW_S``."""
        self._logged_at: float | None = None
        self._probed_at = 0.0
        metrics.count_from(
            "oss_resends_requested", "Resend asks sent to replicas for chunks lost on the way", lambda: self.requested
        )
        metrics.count_from("oss_resends_served", "Holes in a stream's seq filled after a resend ask", lambda: self.served)
        metrics.count_from(
            "oss_resends_failed",
            "Holes that ended their stream after resend asks (the replica no longer held them, or the timeout passed)",
            lambda: self.failed,
        )

    # -- once per sweep ----------------------------------------------------------

    def sweep(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        holes = self.holes
        seen: set[str] = set()
        for request_id, state in self.registry.active.items():
            found = _hole_of(state, now)
            if found is None:
                continue
            first, end, since = found
            seen.add(request_id)
            wire_id = state.attempt.wire_id
            hole = holes.get(request_id)
            if hole is None or hole.wire_id != wire_id or hole.first != first:
                if hole is not None and hole.asks:
                    self.served += 1  # the one before it filled
                replica = self.backend.replica_of(wire_id) if self.backend is not None else None
                hole = holes[request_id] = _Hole(wire_id, first, end, since, replica)
                if end is not None:
                    self._lost(now, "gap", replica)
            else:
                hole.end = end
            self._maybe_ask(hole, now)
        for request_id in [rid for rid in holes if rid not in seen]:
            hole = holes.pop(request_id)
            if not hole.asks:
                continue
            state = self.registry.get(request_id)
            if state is None or state.status is Status.CANCELLED:
                continue  # the client left (or it was forgotten): neither
            if state.status is Status.FAILED:
                self.failed += 1
                self._lost(now, "failed", hole.replica)
            else:
                self.served += 1  # it filled (and may have finished since)
        if self.backend is not None and now - self._probed_at >= PROBE_INTERVAL_S:
            self._probed_at = now
            self.backend.probe_silent()
        self._maybe_log(now)

    def _maybe_ask(self, hole: _Hole, now: float) -> None:
        if hole.unsupported or self.backend is None or hole.asks >= MAX_RESEND_ASKS or now - hole.since < RESEND_AFTER_S:
            return
        if hole.last_ask_at is not None and now - hole.last_ask_at < self.interval_s:
            return
        if not self.backend.ask_resend(hole.wire_id, hole.first, hole.end):
            hole.unsupported = True
            return
        hole.asks += 1
        hole.last_ask_at = now
        self.requested += 1

    # -- from the backend -------------------------------------------------------

    def missed(self, wire_id: str, first: int, replica_id: str | None) -> None:
        """The replica no longer holds ``first`` of ``wire_id`` (or the request at all): end that stream now."""
        state = self.registry.active.get(wire_id.split("~", 1)[0])
        if state is None or state.done or state.attempt.wire_id != wire_id or first < len(state.log.pieces):
            return  # already ended, an earlier attempt's, or the hole has filled since the ask
        where = f"replica {replica_id!r}" if replica_id else "the replica"
        self.registry.fail(
            state, UpstreamError(f"chunk seq {first} was lost on the way and {where} no longer holds it", code="missing_chunk")
        )
        hole = self.holes.pop(state.request_id, None)
        self.failed += 1
        self._lost(time.monotonic(), "failed", replica_id if hole is None else hole.replica or replica_id)

    # -- reporting ---------------------------------------------------------------

    def _lost(self, now: float, kind: str, replica: str | None) -> None:
        self._losses.append((now, kind, replica))

    def _trim(self, now: float) -> None:
        losses = self._losses
        while losses and now - losses[0][0] > LOSS_WINDOW_S:
            losses.popleft()

    @property
    def losing(self) -> bool:
        """Chunks were lost in the last minute."""
        self._trim(time.monotonic())
        return bool(self._losses)

    def health(self) -> dict[str, Any]:
        """For ``/health``: holes and failed resends of the last minute, per replica, and the counters."""
        self._trim(time.monotonic())
        gaps = sum(1 for _, kind, _ in self._losses if kind == "gap")
        failed = len(self._losses) - gaps
        by_replica: dict[str, int] = {}
        for _, kind, replica in self._losses:
            if kind == "gap":
                by_replica[replica or "unknown"] = by_replica.get(replica or "unknown", 0) + 1
        body: dict[str, Any] = {
            "gaps_last_minute": gaps,
            "resends_failed_last_minute": failed,
            "by_replica": by_replica,
            "resends": {"requested": self.requested, "served": self.served, "failed": self.failed},
        }
        if self._losses:
            body["likely_cause"] = LIKELY_CAUSE
        return body

    def _maybe_log(self, now: float) -> None:
        if not self._losses or (self._logged_at is not None and now - self._logged_at < LOSS_LOG_INTERVAL_S):
            return
        self._trim(now)
        if not self._losses:
            return
        self._logged_at = now
        report = self.health()
        replicas = ", ".join(f"{rid!r} ({n})" for rid, n in sorted(report["by_replica"].items())) or "-"
        logger.warning(
            "chunks from model replicas are being lost: %d gap(s) in the last minute (by replica: %s), %d resend(s) failed; %s",
            report["gaps_last_minute"],
            replicas,
            report["resends_failed_last_minute"],
            LIKELY_CAUSE,
        )


class ResendRoutes:
    """Which replicas take resend asks, and on which output (the bridge's; docs/architecture.md, "Resend").

    A replica is asked on ``resend/<replica id>`` (the single-model layout: ``resend``) when the server
    node declares that output and the replica said ``can_resend`` in its hello or a heartbeat.
    """

    def __init__(self, config: Mapping[str, Any] | None, replicas: Iterable[Replica]) -> None:
        declared = {str(o) for o in (config or {}).get("outputs") or []}
        self.outputs: dict[str, str] = {}
        for replica in replicas:
            name = RESEND_OUTPUT if replica.request_output == REQUEST_OUTPUT else f"{RESEND_OUTPUT}/{replica.replica_id}"
            if name in declared:
                self.outputs[replica.replica_id] = name
        self.capable: set[str] = set()

    def said(self, replica_id: str, can_resend: bool) -> None:
        """What the replica's last hello or heartbeat said."""
        if can_resend:
            self.capable.add(replica_id)
        else:
            self.capable.discard(replica_id)

    def output_for(self, replica_id: str) -> str | None:
        """Where to send it asks; None when it takes none."""
        return self.outputs.get(replica_id) if replica_id in self.capable else None


LIKELY_CAUSE = (
    "the likely cause is a dora daemon's inter-daemon publish channel filling up "
    '("zenoh publish channel full" in its log): across machines send several tokens per message '
    '(step batches, the batch form; docs/deploy.md, "Several machines")'
)


def _hole_of(state: StreamState, now: float) -> tuple[int, int | None, float] | None:
    """``(first seq missing, end or None, since when)`` of a stream's hole, or of its suspected lost end; else None."""
    reorder = state.reorder
    first = len(state.log.pieces)
    if reorder.gap_since is not None and reorder.held:
        return first, min(reorder.held), reorder.gap_since
    last, started = state.last_chunk_at, state.first_chunk_at
    if last is None or started is None or first <= state.attempt.start_pieces:
        return None  # nothing yet from this attempt: the first-chunk and attempt timeouts watch it
    pace = (last - started) / (first - 1) if first > 1 else 0.0
    if now - last < max(TAIL_IDLE_S, TAIL_PACE_FACTOR * pace):
        return None
    return first, None, last
