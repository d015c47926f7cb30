"""Model replicas: which copies of the model node exist, which are live, which holds each request.

A dataflow declares replicas on the server node itself (docs/architecture.md, "Replicas and
failover"): one request output per replica, ``v1/chat/completions/<node id>``, with an optional
``cancel/<node id>``; that node's chunk outputs are the server inputs whose source is
``<node id>/...``. dora sends an output to every subscriber, so one output per replica is what
makes a request reach exactly one copy. The single-model layout (plain ``v1/chat/completions`` and
``cancel``) is one replica made of every answer input no declared replica claims.

Everything here runs on the event-loop thread, except ``LegacyReplicas``, which the bridge's reader
thread owns; the reader thread only reports events.

Failover (docs/architecture.md, "Failover"): what a replica said of itself (its hello's
``can_continue`` and ``heartbeat_s``, its heartbeats' load), why it is down (``DownReason``: a
silent one comes back on any word from it, a restarted one that sends hellos only on its hello),
and a circuit breaker: after ``BREAKER_FAILURES`` failures in a row (a death, a busy answer, a
first-chunk timeout, a failed send) it is skipped for a back-off that doubles from
``BREAKER_BASE_S`` up to ``BREAKER_MAX_S``, then given one request again (a probe).
"""

from __future__ import annotations

import enum
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from openai_stream_protocol import CANCEL_OUTPUT, REQUEST_OUTPUT

DEFAULT_REPLICA = "default"


BREAKER_FAILURES = 3
"""Failures in a row after which a replica is skipped for a while (its circuit opens)."""
BREAKER_BASE_S = 1.0
"""The first back-off; each failure past ``BREAKER_FAILURES`` doubles it."""
BREAKER_MAX_S = 30.0
"""The longest back-off: a replica that keeps failing is still probed this often."""
LOAD_STALE_S = 1.0
"""A heartbeat's load older than this is not used for routing (four missed beats at the default 0.25 s)."""


def is_tick(input_id: str) -> bool:
    return input_id == "tick" or input_id.startswith("dora/timer")


class DownReason(enum.Enum):
    CLOSED = "closed"  # its answer inputs closed (its process exited; `dora node restart`)
    RESTARTED = "restarted"  # dora restarted it, or a new process said hello
    SILENT = "silent"  # it held requests and said nothing for --replica-silence-s (stopped, hung, cut off)


@dataclass(eq=False, slots=True)
class Replica:
    """One copy of the model node: where its requests go, where its answers come from, what it holds."""

    replica_id: str
    request_output: str
    cancel_output: str | None
    inputs: frozenset[str]
    """The server inputs that carry its answers; all closed means its process is gone."""
    nodes: frozenset[str]
    """The dora node ids it stands for (a ``NODE_RESTARTED`` names one)."""
    live: bool = True
    open_inputs: set[str] = field(default_factory=set)
    held: dict[str, None] = field(default_factory=dict)
    """The wire ids of the requests in flight on it, oldest first (an ordered set)."""
    served: int = 0
    """Requests it completed."""
    failures: int = 0
    """Times it died (inputs closed) or was restarted by dora."""
    retries: int = 0
    """Requests re-sent elsewhere because it died before they had a chunk."""
    down_since: float | None = None
    down_reason: DownReason | None = None
    hellos: int = 0
    """Hello messages seen: one per process start that reached the server."""
    can_continue: bool = False
    """Its hello (or a heartbeat) said it continues answers other replicas started."""
    heartbeat_s: float | None = None
    """The heartbeat interval it promised in its hello, or the default once it sent a heartbeat; None: it sends none,
    and silence never counts against it (a node without heartbeats keeps the older behaviour)."""
    load: tuple[int, int] | None = None
    """``(active, queued)`` from its last heartbeat (for /health, and routing with several servers)."""
    load_at: float = 0.0
    """When that heartbeat came (``time.monotonic()``)."""
    load_base: int = 0
    """This server's ``in_flight`` on it when that heartbeat came: what the report already counts of ours."""
    busy_since: float | None = None
    """When it last went from holding nothing to holding a request: its silence counts from then at the earliest."""
    streak: int = 0
    """Failures in a row (a completed request ends the streak)."""
    backoff_s: float = 0.0
    skip_until: float = 0.0
    """While ``time.monotonic()`` is before this, the breaker keeps new requests away (unless nothing else is live)."""
    silences: int = 0
    """Times it went silent while holding requests."""
    models: tuple[str, ...] = ()
    """The model names its hello (or a heartbeat) said it serves: its model group (docs/team.md, "Models by name")."""
    capacity: int | None = None
    """Requests it generates at once, as its hello said (None: unknown); the admission queue sums a group's
    (``gateway/queue.py``, docs/team.md, "Queue and tiers")."""

    def __post_init__(self) -> None:
        self.open_inputs = set(self.inputs)

    @property
    def in_flight(self) -> int:
        return len(self.held)

    def routing_load(self, now: float) -> int:
        """Its requests as routing sees them: ours in flight, or more when its last heartbeat says it holds more.

        With several server processes each knows only its own requests; the replica's heartbeat counts every
        server's (docs/architecture.md, "Several server processes"). The report plus what we sent or ended since
        it; never below ours, so that with one server this is ``in_flight``. A busy replica beats every
        ``heartbeat_s`` and an idle one says 0 once, so a report that has not been renewed for ``LOAD_STALE_S``
        is no longer believed.
        """
        load = self.load
        if load is None or now - self.load_at > LOAD_STALE_S:
            return len(self.held)
        return max(len(self.held), load[0] + load[1] + len(self.held) - self.load_base)

    def failed(self, now: float) -> None:
        """One more failure in a row; from ``BREAKER_FAILURES`` on, skip it for a back-off that doubles each time."""
        self.streak += 1
        if self.streak >= BREAKER_FAILURES:
            self.backoff_s = min(BREAKER_MAX_S, self.backoff_s * 2 if self.backoff_s else BREAKER_BASE_S)
            self.skip_until = now + self.backoff_s

    def succeeded(self) -> None:
        self.streak = 0
        self.backoff_s = 0.0
        self.skip_until = 0.0


def discover(config: Mapping[str, Any] | None) -> list[Replica]:
    """The replicas a server node's ``node_config()`` declares (None: unknown, one default replica)."""
    if config is None:
        return [Replica(DEFAULT_REPLICA, REQUEST_OUTPUT, CANCEL_OUTPUT, frozenset(), frozenset())]
    outputs = [str(o) for o in config.get("outputs") or []]
    by_node: dict[str, set[str]] = {}
    for input_id, source in (config.get("inputs") or {}).items():
        name = source.get("source", "") if isinstance(source, dict) else str(source)
        if is_tick(input_id) or name.startswith("dora/"):
            continue
        by_node.setdefault(name.split("/", 1)[0], set()).add(input_id)
    prefix = REQUEST_OUTPUT + "/"
    replicas = []
    for output in outputs:
        if output.startswith(prefix):
            replica_id = output[len(prefix) :]
            cancel = f"{CANCEL_OUTPUT}/{replica_id}"
            inputs = frozenset(by_node.pop(replica_id, ()))
            replicas.append(Replica(replica_id, output, cancel if cancel in outputs else None, inputs, frozenset({replica_id})))
    if REQUEST_OUTPUT in outputs or not replicas:
        nodes = frozenset(by_node)
        inputs = frozenset(i for group in by_node.values() for i in group)
        replica_id = next(iter(nodes)) if len(nodes) == 1 else DEFAULT_REPLICA
        cancel = CANCEL_OUTPUT if CANCEL_OUTPUT in outputs or not outputs else None
        replicas.append(Replica(replica_id, REQUEST_OUTPUT, cancel, inputs, nodes))
    return replicas


class ReplicaSet:
    """Routing (least in flight first, ties round robin), liveness and who holds which request."""

    def __init__(self, replicas: list[Replica]) -> None:
        self.replicas = replicas
        self.by_id = {r.replica_id: r for r in replicas}
        self.by_input = {i: r for r in replicas for i in r.inputs}
        self.by_node = {n: r for r in replicas for n in r.nodes}
        self.holder: dict[str, Replica] = {}
        """Wire request id -> the replica it was sent to, until it ends or the replica dies."""
        self._next = 0
        """Where the next scan starts: rotates past each pick, so ties go round robin."""
        self.spread: int | None = None
        """Several servers (docs/architecture.md, "Several server processes"): this server's place among them. Ties then
        go by the count of picks plus it, so that servers that decide at the same moment on the same heartbeat loads
        pick different replicas instead of herding onto one. None: round robin past the last pick."""
        self._picks = 0

    def of_input(self, input_id: str) -> Replica | None:
        """The replica whose answers come on ``input_id`` (None: not an answer input of any replica)."""
        replica = self.by_input.get(input_id)
        if replica is None and len(self.replicas) == 1 and not self.replicas[0].inputs:
            return self.replicas[0]  # its inputs are unknown (no node_config): every input is its
        return replica

    @property
    def any_live(self) -> bool:
        return any(r.live for r in self.replicas)

    def outside_group(self, model: object) -> set[str]:
        """The replicas a request for ``model`` must not go to: those of other model groups, when some replica named
        ``model`` in its hello (docs/team.md, "Models by name"); none when no replica did (one group: any name)."""
        if not isinstance(model, str) or not any(model in r.models for r in self.replicas):
            return set()
        return {r.replica_id for r in self.replicas if model not in r.models}

    def pick(
        self, avoid: str | Collection[str] | None = None, *, continuing: bool = False, skip: Collection[str] = ()
    ) -> Replica | None:
        """The live replica with the fewest requests in flight (``routing_load``; ties: the next in turn).

        ``continuing``: only one that said it can continue an answer. Preferred in this order: one
        neither in ``avoid`` (it failed this request) nor kept away by its breaker; one the breaker
        keeps away; one in ``avoid``, which is better than nothing when it is alone. ``skip``: never.
        A scan of the replicas per request: there are a handful, and this runs once per request, not per chunk.
        """
        avoided = {avoid} if isinstance(avoid, str) else set(avoid or ())
        replicas = self.replicas
        n = len(replicas)
        now = time.monotonic()
        best: Replica | None = None
        best_rank: tuple[bool, bool, int] | None = None
        best_at = 0
        start = self._next if self.spread is None else self._picks + self.spread
        for k in range(n):
            at = (start + k) % n
            r = replicas[at]
            if not r.live or (continuing and not r.can_continue) or r.replica_id in skip:
                continue
            rank = (r.replica_id in avoided, r.skip_until > now, r.routing_load(now))
            if best_rank is None or rank < best_rank:
                best, best_rank, best_at = r, rank, at
        if best is not None:
            self._next = (best_at + 1) % n
            self._picks += 1
        return best

    def assign(self, request_id: str, replica: Replica) -> None:
        self.holder[request_id] = replica
        if not replica.held:
            replica.busy_since = time.monotonic()
        replica.held[request_id] = None

    def release(self, request_id: str, completed: bool) -> Replica | None:
        """The request ended (or left the replica): it no longer counts there; the replica that held it."""
        replica = self.holder.pop(request_id, None)
        if replica is not None:
            del replica.held[request_id]
            if completed:
                replica.served += 1
                replica.succeeded()
        return replica

    def take_held(self, replica: Replica) -> list[str]:
        """Forget every request ``replica`` holds (it died) and return their ids, oldest first."""
        held = list(replica.held)
        for rid in held:
            del self.holder[rid]
        replica.held.clear()
        replica.failures += 1
        replica.failed(time.monotonic())
        return held

    def oldest_held(self, replica: Replica, skip: set[str]) -> str | None:
        """The oldest request ``replica`` holds that is not in ``skip``: the one a legacy reply without an id answers.

        A legacy reply is a whole answer, so every request a legacy replica still holds is waiting for one.
        """
        for request_id in replica.held:
            if request_id not in skip:
                return request_id
        return None

    def input_closed(self, input_id: str) -> Replica | None:
        """An answer input closed; the replica if that was its last open one and it was live (it died)."""
        replica = self.by_input.get(input_id)
        if replica is None:
            return None
        replica.open_inputs.discard(input_id)
        if replica.open_inputs or not replica.live:
            return None
        replica.live = False
        replica.down_since = time.monotonic()
        replica.down_reason = DownReason.CLOSED
        return replica

    def input_seen(self, input_id: str) -> Replica | None:
        """An event came on a closed answer input (a hello or a chunk): the replica if that revived it."""
        replica = self.by_input.get(input_id)
        if replica is None:
            return None
        replica.open_inputs.add(input_id)
        if replica.live:
            return None
        replica.live = True
        replica.down_since = None
        replica.down_reason = None
        return replica

    def node_restarted(self, node_id: str) -> Replica | None:
        """dora restarted a node (its restart policy): the replica it belongs to, down until it is seen again.

        Not live at once: dora 1.1.0 drops what is sent to a restarted node until the new process has
        subscribed (the daemon logs "node has no daemon event stream"), so a request sent in between
        would be lost. Its hello (or any event) says it has (docs/architecture.md, "Facts measured").
        """
        replica = self.by_node.get(node_id)
        if replica is not None:
            replica.open_inputs = set(replica.inputs)
            replica.live = False
            replica.down_since = time.monotonic()
            replica.down_reason = DownReason.RESTARTED
        return replica

    def went_silent(self, replica: Replica) -> None:
        """It held requests and said nothing for too long: down until it says anything again (the same process)."""
        replica.live = False
        replica.down_since = time.monotonic()
        replica.down_reason = DownReason.SILENT
        replica.silences += 1

    def assume_up(self, replica: Replica, failures: int) -> bool:
        """A restarted replica never said hello: count it live after all (unless it failed again since)."""
        if replica.live or replica.failures != failures:
            return False
        replica.live = True
        replica.down_since = None
        replica.down_reason = None
        return True

    def stats(self, seen_at: Mapping[str, float]) -> list[dict[str, Any]]:
        """For /health: each replica's state; ``last_seen_s`` is how long ago its last event came."""
        now = time.monotonic()
        rows = []
        for r in self.replicas:
            seen = [seen_at[i] for i in r.inputs if i in seen_at]
            rows.append(
                {
                    "id": r.replica_id,
                    "live": r.live,
                    "in_flight": r.in_flight,
                    "served": r.served,
                    "failures": r.failures,
                    "retries": r.retries,
                    "last_seen_s": round(now - max(seen), 3) if seen else None,
                    "can_continue": r.can_continue,
                    "heartbeat_s": r.heartbeat_s,
                    "load": None if r.load is None else {"active": r.load[0], "queued": r.load[1]},
                    "down_reason": None if r.down_reason is None else r.down_reason.value,
                    "backoff_s": round(r.skip_until - now, 3) if r.skip_until > now else 0,
                }
            )
        return rows


class LegacyReplicas:
    """Which replicas are legacy ones: none of their answer inputs ever sent a hello or a chunk with ``seq``.

    A reply with neither ``request_id`` nor ``seq`` answers the oldest request of the replica it came
    from, and only when that replica is a legacy one (docs/architecture.md, "Legacy replies (no seq)").
    Owned by the bridge's reader thread, which alone sees which input each message came on.
    """

    __slots__ = ("_replicas", "numbered")

    def __init__(self, replicas: ReplicaSet) -> None:
        self._replicas = replicas
        self.numbered: set[str] = set()
        """Answer inputs that sent a hello or a chunk with ``seq`` (the reader adds to it, once per message)."""

    def replica_of(self, input_id: str) -> Replica | None:
        """The replica an unnamed reply on ``input_id`` answers for, if it is a legacy one; else None (dropped)."""
        replica = self._replicas.of_input(input_id)
        if replica is None:
            return None
        if replica.inputs:
            return replica if self.numbered.isdisjoint(replica.inputs) else None
        return None if self.numbered else replica  # the one replica, on every input
