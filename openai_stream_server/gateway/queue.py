"""Admission with a visible queue: each model group's requests beyond its replicas' capacity wait here, in tier order.

A group's capacity is the sum of what its live replicas said they can generate at once (``capacity`` in
their hello, echo-stream's ``ECHO_MAX_CONCURRENT``); what is in use is the larger of this server's
admitted requests and the replicas' own load reports (heartbeats: ``active`` + ``queued``, which count
every server's requests). Waiting happens only when the capacity is known and a bound is set
(``--max-queued``, or the key's ``max_queued``): with neither, every request goes downstream at once,
as before (docs/team.md, "Queue and tiers").

Tiers (``service_tier``): ``priority`` waiters go before ``default`` ones, ``default`` before ``flex``;
in order of arrival within a tier. A full queue refuses a newcomer with 429 ``rate_limit_exceeded`` and
``Retry-After`` unless a waiter of a worse tier is there: then the newest waiter of the worst tier present
is shed (it gets the 429; ``flex`` first, then ``default`` for a ``priority`` newcomer) and the newcomer
takes its place.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..errors import Cancelled, InvalidRequest
from .ratelimit import RateLimited

if TYPE_CHECKING:
    from ..replicas import Replica

TIERS = ("priority", "default", "flex")
"""In queue order: a waiter of an earlier tier goes first."""
RECHECK_S = 0.25
"""A waiter looks at the capacity again this often: heartbeats and hellos change it without a release here."""


def parse_tier(value: str | None, *, param: str = "service_tier") -> str | None:
    """A request's ``service_tier``: one of ``TIERS``, ``auto`` (None: the key's default), or 400."""
    if value is None or value == "auto":
        return None
    if value not in TIERS:
        raise InvalidRequest(f"service_tier must be one of auto, {', '.join(TIERS)}; got {value!r}", param=param)
    return value


def effective_tier(asked: str | None, default: str | None, maximum: str | None) -> str:
    """The tier a request gets: what it asked (or its key's default, else ``default``), no better than the key's maximum."""
    tier = asked or default or "default"
    if maximum is not None and TIERS.index(tier) < TIERS.index(maximum):
        tier = maximum
    return tier


def parse_max_queued(entries: Sequence[str]) -> tuple[int | None, dict[str, int]]:
    """``("8", "echo=2")`` -> ``(8, {"echo": 2})``: a bare number is every group's bound, ``GROUP=N`` one group's."""
    every: int | None = None
    groups: dict[str, int] = {}
    for entry in entries:
        name, equals, number = entry.rpartition("=")
        try:
            bound = int(number)
        except ValueError:
            raise ValueError(f"max_queued: {entry!r} is not N or GROUP=N") from None
        if bound < 0 or (equals and not name.strip()):
            raise ValueError(f"max_queued: {entry!r} is not N or GROUP=N (N >= 0)")
        if equals:
            groups[name.strip()] = bound
        else:
            every = bound
    return every, groups


class QueueMetrics:
    """``oss_queue_requests_total{model,key,tier,outcome}`` and ``oss_queue_waiting{model,tier}`` (docs/team.md)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests = Counter(
            "oss_queue_requests",
            "Requests where an admission queue applies, by model group, key name, tier and outcome "
            "(admitted: at once; queued: waited; rejected: the queue was full; shed: gave way to a better tier; "
            "left: the client went while waiting)",
            ["model", "key", "tier", "outcome"],
            registry=registry,
        )
        self.waiting = Gauge(
            "oss_queue_waiting", "Requests waiting, by model group and tier", ["model", "tier"], registry=registry
        )

        self._children: dict[tuple[str, str, str, str], Any] = {}
        """Each label set's child of the counter: ``labels()`` costs more than the rest of an admission."""

    def count(self, queue: GroupQueue, ticket: Ticket, outcome: str) -> None:
        labels = (queue.name or "*", ticket.key or "", ticket.tier, outcome)
        child = self._children.get(labels)
        if child is None:
            child = self._children[labels] = self.requests.labels(*labels)
        child.inc()


class QueueFull(RateLimited):
    """The group's queue (or the key's share of it) is full, or this waiter was shed for a higher tier."""


@dataclass(eq=False, slots=True)
class Ticket:
    """One request's place: waiting (``position`` >= 1) until admitted; ``release`` once its completion ended."""

    queue: GroupQueue
    tier: str
    key: str | None
    key_bound: int | None = None
    position: int = 0
    """1 for the next to go in; 0 once admitted (or never queued)."""
    admitted: bool = False
    counted: bool = False
    """It holds one of the group's slots (``GroupQueue.in_use``) until ``release``: only where a queue applies."""
    shed: QueueFull | None = None
    left: bool = False
    """It left the queue before its turn (``leave``): it will never be admitted."""
    queued_at: float = field(default_factory=time.monotonic)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    released: bool = False

    @property
    def waiting(self) -> bool:
        return not self.admitted and self.shed is None and not self.left

    async def positions(self) -> AsyncIterator[int]:
        """Each new position while it waits (the first at once); returns once admitted; raises ``QueueFull`` if shed,
        ``Cancelled`` if it was taken out of the queue (``leave``: a cancel by id).

        Closed early (the client left), the ticket leaves the queue: nothing was sent downstream.
        """
        closed = True
        try:
            async for position in self.watch(pump=True):
                yield position
            closed = False
            if self.shed is not None:
                raise self.shed
            if self.left:
                raise Cancelled("the request was cancelled while it was queued")
        finally:
            if closed:
                self.leave()

    async def watch(self, *, pump: bool = False) -> AsyncIterator[int]:
        """Each new position while it waits, for an onlooker (a background request's stream): closing it leaves the
        ticket where it is. ``pump``: the waiter itself, which also nudges the queue when nothing changed for a while."""
        said = 0
        while self.waiting:
            if self.position != said:
                said = self.position
                yield said
                continue
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), RECHECK_S)
            except TimeoutError:
                if pump:
                    self.queue.pump()

    async def wait(self) -> None:
        """Until admitted (``positions`` without the positions)."""
        async for _ in self.positions():
            pass

    def leave(self) -> None:
        """The client went before its turn: out of the queue, nothing downstream."""
        if self.waiting and self.queue.remove(self):
            self.queue.queues.metrics.count(self.queue, self, "left")
            self.left = True
            self.changed.set()

    def release(self) -> None:
        """Its completion ended (or never opened): its slot goes to the next waiter."""
        if self.released:
            return
        self.released = True
        if self.counted:
            self.queue.in_use -= 1
            if len(self.queue):  # someone waits for the slot
                self.queue.pump()
        else:
            self.leave()


class GroupQueue:
    """One model group's admitted count and its waiters, by tier."""

    def __init__(self, name: str, queues: AdmissionQueues) -> None:
        self.name = name
        self.queues = queues
        self.in_use = 0
        """This server's admitted requests of the group whose completion has not ended."""
        self.waiters: dict[str, deque[Ticket]] = {tier: deque() for tier in TIERS}
        self.admitted_total = dict.fromkeys(TIERS, 0)
        self.shed_total = dict.fromkeys(TIERS, 0)

    def __len__(self) -> int:
        return sum(len(w) for w in self.waiters.values())

    def lengths(self) -> dict[str, int]:
        return {tier: len(w) for tier, w in self.waiters.items()}

    def free(self) -> int | None:
        """Slots free now (None: capacity unknown, never wait)."""
        capacity, reported = self.queues.load(self.name)
        if capacity is None:
            return None
        return capacity - max(self.in_use, reported)

    def order(self) -> list[Ticket]:
        return [t for tier in TIERS for t in self.waiters[tier]]

    def remove(self, ticket: Ticket) -> bool:
        waiters = self.waiters[ticket.tier]
        if ticket not in waiters:
            return False
        waiters.remove(ticket)
        self.renumber()
        return True

    def _admit(self, ticket: Ticket) -> None:
        ticket.admitted = ticket.counted = True
        ticket.position = 0
        self.in_use += 1
        self.admitted_total[ticket.tier] += 1
        ticket.changed.set()

    def pump(self) -> None:
        """Let waiters in, in order, while there is room; then tell the rest their new places."""
        moved = False
        for tier in TIERS:
            waiters = self.waiters[tier]
            while waiters:
                free = self.free()
                if free is not None and free <= 0:
                    break
                self._admit(waiters.popleft())
                moved = True
            if waiters:
                break
        if moved:
            self.renumber()

    def renumber(self) -> None:
        gauge = self.queues.metrics.waiting
        for tier, waiters in self.waiters.items():
            gauge.labels(self.name or "*", tier).set(len(waiters))
        for position, ticket in enumerate(self.order(), 1):
            if ticket.position != position:
                ticket.position = position
                ticket.changed.set()

    def shed(self, ticket: Ticket, error: QueueFull) -> None:
        self.waiters[ticket.tier].remove(ticket)
        ticket.shed = error
        self.shed_total[ticket.tier] += 1
        self.queues.metrics.count(self, ticket, "shed")
        ticket.changed.set()
        self.renumber()


class AdmissionQueues:
    """Every model group's queue; ``enter`` is the one call a request makes (``api/dispatch.py``)."""

    def __init__(
        self,
        max_queued: Sequence[str],
        groups: Callable[[], dict[str, list[Replica]]],
        replicas: Callable[[], Sequence[Replica]],
        metrics: QueueMetrics | None = None,
        retry_after_s: float = 1.0,
    ) -> None:
        self.every, self.bounds = parse_max_queued(max_queued)
        self.metrics = metrics or QueueMetrics(CollectorRegistry())
        self.groups = groups
        self.replicas = replicas
        self.retry_after_s = retry_after_s
        self.queues: dict[str, GroupQueue] = {}

    def group_of(self, model: str) -> str:
        """The group a request for ``model`` waits in: its model group, or ``""`` (every replica) with none."""
        return model if model in self.groups() else ""

    def members(self, group: str) -> list[Replica]:
        return self.groups().get(group, []) if group else list(self.replicas())

    def load(self, group: str) -> tuple[int | None, int]:
        """``(capacity, reported load)`` of the group's live replicas; capacity None when one has not said its own."""
        live = [r for r in self.members(group) if r.live]
        if not live or any(r.capacity is None for r in live):
            return None, 0
        now = time.monotonic()
        return sum(r.capacity or 0 for r in live), sum(r.routing_load(now) for r in live)

    def queue(self, group: str) -> GroupQueue:
        queue = self.queues.get(group)
        if queue is None:
            queue = self.queues[group] = GroupQueue(group, self)
        return queue

    def bound(self, group: str) -> int | None:
        return self.bounds.get(group, self.every)

    def enter(self, model: str, tier: str, key: str | None = None, key_bound: int | None = None) -> Ticket:
        """A request's ticket: admitted at once when there is room or no queue applies, else waiting (``positions``).

        Raises ``QueueFull`` (429) when the group's bound, or the key's, is reached and nothing of a lower tier can
        be shed.
        """
        queue = self.queue(self.group_of(model))
        ticket = Ticket(queue, tier, key, key_bound)
        bound = self.bound(queue.name)
        if bound is None and key_bound is None:  # no queue applies: as before, straight downstream
            ticket.admitted = True
            return ticket
        free = queue.free()
        if free is None or (free > 0 and not len(queue)):
            queue._admit(ticket)
            ticket.changed.clear()
            self.metrics.count(queue, ticket, "admitted")
            return ticket
        if key_bound is not None and sum(t.key == key for t in queue.order()) >= key_bound:
            self.metrics.count(queue, ticket, "rejected")
            raise self._full(f"Key '{key}' has {key_bound} requests waiting for model group '{queue.name or model}'.")
        if bound is not None and len(queue) >= bound:
            worse = next((w for t in reversed(TIERS[TIERS.index(tier) + 1 :]) if (w := queue.waiters[t])), None)
            if worse is None:
                self.metrics.count(queue, ticket, "rejected")
                raise self._full(f"The queue for model '{model}' is full ({bound} waiting); try again shortly.")
            queue.shed(worse[-1], self._full(f"The queue for model '{model}' is full: this request gave way to a better tier."))
        self.metrics.count(queue, ticket, "queued")
        queue.waiters[tier].append(ticket)
        queue.renumber()
        queue.pump()
        return ticket

    def _full(self, message: str) -> QueueFull:
        return QueueFull(message, retry_after_s=self.retry_after_s)

    def health(self) -> dict[str, dict[str, object]]:
        """For /health: each group's capacity, admitted and waiting (by tier)."""
        out: dict[str, dict[str, object]] = {}
        for name, queue in self.queues.items():
            capacity, _ = self.load(name)
            out[name or "*"] = {
                "capacity": capacity,
                "admitted": queue.in_use,
                "queued": len(queue),
                "queued_by_tier": queue.lengths(),
                "max_queued": self.bound(name),
                "shed": dict(queue.shed_total),
            }
        return out
