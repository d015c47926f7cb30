"""Opening a completion and sending it downstream: the same for every API surface.

A surface turns its request into parts and sampling options; ``Dispatcher`` opens the
``StreamState`` in the registry, waits for a live replica, sends the ``DownstreamRequest`` and
waits, for the surface, for the first chunk or the end (docs/architecture.md, "A request's path through the code").
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

from prometheus_client import Counter
from starlette.requests import Request

from openai_stream_protocol import Part, split_tokens

from ..admission import Admission
from ..backend import Backend, DownstreamRequest
from ..errors import ApiError, Cancelled
from ..gateway.models import ModelCatalog
from ..gateway.owner import CURRENT_KEY, stamp
from ..gateway.queue import AdmissionQueues, QueueMetrics, Ticket, effective_tier, parse_tier
from ..registry import StreamRegistry
from ..settings import Settings
from ..state import Status, StreamState
from .common import end_error, unless_disconnected


def sampling_metadata(
    request_id: str,
    model: str,
    *,
    stream: bool,
    max_tokens: int | None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: str | Sequence[str] | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """The request metadata every node reads (docs/architecture.md, "Dora wire protocol").

    ``stop``: one string or several (the surface's model has checked their number and length,
    ``schema.MAX_STOP_STRINGS``), always sent as a list.
    """
    metadata: dict[str, Any] = {
        "request_id": request_id,
        "session_id": request_id,
        "model": model,
        "stream": stream,
        "max_tokens": max_tokens or 0,
    }
    if temperature is not None:
        metadata["temperature"] = float(temperature)
    if top_p is not None:
        metadata["top_p"] = float(top_p)
    if stop is not None:
        metadata["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if seed is not None:
        metadata["seed"] = seed
    return metadata


MAX_TIER_SERIES = 1000
"""``oss_tier_requests_total`` series at most: the model label is a name the client sent (with one group, any)."""


def queued_comment(position: int) -> bytes:
    """A waiting stream's place, as an SSE comment line (``: queued 3``): every SSE decoder skips comments."""
    return b": queued %d\n\n" % position


def failed_state(request_id: str, model: str, surface: str, error: ApiError) -> StreamState:
    """A completion that failed before it opened (refused after its stream's headers went out, while it waited):
    rendered by the surface's own renderer as its error event; never in the registry."""
    state = StreamState(request_id, model, surface)
    state.fail(error)
    return state


def prompt_tokens(parts: Sequence[Part]) -> int:
    """The server's token estimate of a prompt: whitespace-split words of its parts."""
    return sum(len(split_tokens(p.content)) for p in parts)


class Dispatcher:
    """Opens completions in the registry, sends them to the backend, and waits on them for a surface."""

    def __init__(self, settings: Settings, backend: Backend, registry: StreamRegistry) -> None:
        self.settings = settings
        self.backend = backend
        self.registry = registry
        self.admission = Admission(settings, registry)
        """Reads request bodies under the admission checks, and prepares large ones off the loop."""
        self.catalog = ModelCatalog(settings, backend.replica_stats)
        """The model groups the replicas name, and the aliases."""
        self.queues = AdmissionQueues(
            settings.max_queued, self.catalog.groups, backend.replica_stats, QueueMetrics(registry.metrics.registry)
        )
        """Each model group's admission queue, by tier (docs/team.md, "Queue and tiers")."""
        self._releases: set[asyncio.Future[None]] = set()
        self.waiting: dict[str, tuple[Ticket, str | None]] = {}
        """Background requests waiting in a queue, by id, with their key's name: their stream shows their place."""
        self._later: set[asyncio.Task[None]] = set()
        self.by_tier = Counter(
            "oss_tier_requests",
            "Completions opened, by model, API key name and service tier",
            ["model", "key", "tier"],
            registry=registry.metrics.registry,
        )
        self._tier_children: dict[tuple[str, str, str], Any] = {}
        """Each label triple's child: ``labels()`` costs more than the rest of the count."""

    def model(self, requested: str | None, param: str = "model") -> str:
        """The model a request names (its alias followed; the default when none); 404 naming ``param`` when this server
        has not got it (``ModelCatalog.resolve``, docs/team.md, "Models by name")."""
        return self.catalog.resolve(requested, param)

    def enter(self, model: str, service_tier: str | None = None) -> Ticket:
        """The request's place in its model group's queue, at the tier it asked (``auto``/None: its key's default), no
        better than its key's maximum; 429 when the queue is full (``gateway/queue.py``)."""
        context = CURRENT_KEY.get()
        key = None if context is None else context.key
        tier = effective_tier(parse_tier(service_tier), key.service_tier if key else None, key.max_service_tier if key else None)
        return self.queues.enter(model, tier, None if context is None else context.name, key.max_queued if key else None)

    async def admitted(self, request: Request, ticket: Ticket) -> None:
        """Wait for the ticket's turn; a client that leaves first leaves the queue, and nothing went downstream."""
        if not ticket.waiting:
            return
        try:
            if not await unless_disconnected(request.receive, ticket.wait()):
                raise Cancelled("the client left while its request was queued")
        finally:
            ticket.leave()  # left (or cancelled) before its turn; a no-op once admitted

    async def queued_stream(
        self,
        ticket: Ticket,
        notice: Callable[[int], bytes],
        submit: Callable[[], Awaitable[StreamState]],
        events: Callable[[StreamState], AsyncIterator[bytes]],
        *,
        request_id: str,
        model: str,
        surface: str,
    ) -> AsyncIterator[bytes]:
        """A stream whose headers went out while it waits: ``notice(position)`` at each new place in the queue, then
        the completion's own ``events`` once ``submit`` opened it, or its error in the surface's shape (a failed
        state rendered by the same ``events``). Closed while it waits (the client left), the ticket leaves the queue
        and nothing goes downstream."""
        try:
            async for position in ticket.positions():
                yield notice(position)
            state = await submit()
        except ApiError as error:
            state = self.registry.get(request_id) or failed_state(request_id, model, surface, error)
            state.service_tier = ticket.tier
        finally:
            ticket.leave()  # closed while it waits (the client left): out of the queue now, not when collected
        async for event in events(state):
            yield event

    def submit_later(
        self, request_id: str, surface: str, model: str, parts: Sequence[Part], metadata: dict[str, Any], ticket: Ticket
    ) -> None:
        """A background request that has to wait: its POST is answered at once, and it goes downstream on its turn.
        Shed, cancelled or refused meanwhile, it is retained as failed with that error (nothing went downstream)."""
        context = CURRENT_KEY.get()
        self.waiting[request_id] = (ticket, None if context is None else context.name)

        async def later() -> None:
            try:
                await ticket.wait()
                await self.submit(request_id, surface, model, parts, metadata, ticket=ticket)
            except ApiError as error:
                if self.registry.get(request_id) is None:
                    state = self.registry.open(request_id, model, prompt_tokens=0, surface=surface)
                    stamp(state)
                    state.service_tier = ticket.tier
                    if isinstance(error, Cancelled):  # taken out of the queue by a cancel
                        self.registry.cancel(request_id)
                    else:
                        self.registry.fail(state, error)
            finally:
                self.waiting.pop(request_id, None)

        task = asyncio.ensure_future(later())  # the key's context goes with it: the completion is the key's
        self._later.add(task)
        task.add_done_callback(self._later.discard)

    def close(self) -> None:
        """Shutdown: the background requests still waiting in a queue go nowhere (nothing of them went downstream)."""
        for task in list(self._later):
            task.cancel()

    def waiting_ticket(self, request_id: str) -> Ticket | None:
        """The ticket of a background request still waiting, if the current request's key may see it."""
        entry = self.waiting.get(request_id)
        if entry is None:
            return None
        context = CURRENT_KEY.get()
        return entry[0] if context is None or context.name == entry[1] else None

    async def opened(self, request_id: str, surface: str, timeout_s: float = 30.0) -> StreamState | None:
        """A background request's completion once it left the queue (None: it never opened, or another surface's)."""
        for _ in range(int(timeout_s / 0.02)):
            if self.registry.get(request_id) is not None or request_id not in self.waiting:
                break
            await asyncio.sleep(0.02)
        state = self.registry.get(request_id)
        return state if state is not None and state.surface == surface else None

    async def submit(
        self,
        request_id: str,
        surface: str,
        model: str,
        parts: Sequence[Part],
        metadata: dict[str, Any],
        *,
        keep_parts: bool = False,
        context: object | None = None,
        ticket: Ticket | None = None,
    ) -> StreamState:
        """Open the completion and send it downstream; raises (and records nothing in flight) when it cannot.

        ``keep_parts``: keep the conversation on the state (``surface_data.parts``) for as long as the
        completion is retained, for a later request that continues it. ``context``: what the surface keeps
        to render it again (``surface_data.context``). Both are set before it goes downstream, so that the
        store's "opened" record holds them (docs/store.md, "What is written when").
        """
        if ticket is None:  # a surface that does not queue itself: in the queue here, without a visible place
            ticket = self.enter(model)
            await ticket.wait()
        try:
            # No replica live (one is restarting): wait a little for one rather than fail at once
            # (docs/architecture.md, "Replicas and failover"); returns at once while one is live.
            await self.backend.wait_live(self.settings.model_wait_s)
            tokens, texts = await self.admission.encoded(parts)  # off the loop when large (docs/architecture.md, "Admission")
            state = self.registry.open(request_id, model, prompt_tokens=tokens, surface=surface)
        except BaseException:
            ticket.release()
            raise
        stamp(state)  # it belongs to the request's API key (docs/team.md, "Ownership")
        state.service_tier = ticket.tier
        labels = (model, state.owner or "", ticket.tier)
        counted = self._tier_children.get(labels)
        if counted is None and len(self._tier_children) < MAX_TIER_SERIES:
            counted = self._tier_children[labels] = self.by_tier.labels(*labels)
        if counted is not None:
            counted.inc()
        if ticket.counted:  # its slot goes to the next waiter when it ends
            released = asyncio.ensure_future(state.wait_done())
            self._releases.add(released)
            released.add_done_callback(lambda done: (self._releases.discard(done), ticket.release()))
        state.keep_context(context, getattr(context, "nbytes", 0))
        if keep_parts:
            state.keep_parts(parts)
        downstream = DownstreamRequest(request_id, texts, metadata)
        try:
            self.backend.submit(downstream)
        except ApiError as error:
            self.registry.fail(state, error)  # never submitted: no cancel goes downstream
            raise
        self.registry.sent(state, downstream)
        return state

    async def first_chunk(self, request: Request, state: StreamState) -> None:
        """Before a stream's headers: wait for the first chunk or the end; raise the error if it failed.

        Holding the headers back lets a failure still get a real HTTP status the SDK can retry on
        (docs/architecture.md, HTTP API). A client that leaves meanwhile is cancelled at once.
        """
        if not await unless_disconnected(request.receive, state.wait(0, timeout_s=self.settings.header_grace_s)):
            self.cancel(state.request_id)
            raise end_error(state)
        if state.done and not state.log.nbytes and state.status is not Status.COMPLETED:
            raise end_error(state)

    async def gathered(self, request: Request, state: StreamState) -> None:
        """``stream: false``: wait for the end, cancelling if the client goes first; raise unless completed."""
        if not state.done and not await unless_disconnected(request.receive, state.wait_done()):
            self.cancel(state.request_id)
        if state.status is not Status.COMPLETED:
            raise end_error(state)

    def cancel(self, request_id: str) -> None:
        self.registry.cancel(request_id)

    async def cancel_anywhere(self, request_id: str) -> None:
        """A client's cancel by id: here, or on the server process that runs it (a shared store)."""
        await self.registry.cancel_anywhere(request_id)

    async def resend(self, state: StreamState, request: DownstreamRequest) -> None:
        """Send a request's next attempt, which the registry built when its replica failed it: the same request, or a
        continuation carrying the pieces already delivered (docs/architecture.md, "Failover"). With no replica live
        (one is restarting) it waits up to ``model_wait_s`` for one."""
        await self.backend.wait_live(self.settings.model_wait_s)
        if state.done or state.attempt.wire_id != request.request_id:  # ended, or superseded, meanwhile
            return
        try:
            self.backend.submit(request)
        except ApiError as error:
            self.registry.resend_failed(state, error)
            return
        self.registry.sent(state, request)
