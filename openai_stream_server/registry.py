"""All completions in flight and recently finished, keyed by request id.

The backend delivers chunks here; the HTTP layer opens, reads and cancels
completions here. Chunks for an unknown, finished or cancelled request are
dropped and counted, never delivered to another request.

Memory is bounded per completion (``max_completion_bytes``, in ``state.py``)
and over all of them (``max_total_bytes``): every ``StreamState`` adds what it
holds to one shared ``ByteLedger``, so the total is known without a scan. Over
the bound, retained completions go first, oldest first; new requests are
refused (503, ``Overloaded``) while completions in flight hold more than
``ADMIT_FRACTION`` of it; and if those still grow past the bound, the largest
in flight fails (docs/architecture.md, "Limits and failure behaviour").

How each completion went downstream (its ``Attempt``: wire id, try number, the request to re-send)
is the registry's record: it alone writes it (docs/architecture.md, "Replicas and failover"). When
an attempt fails (its replica died or went silent, answered busy, or sent nothing within
``attempt_timeout_s``) the registry decides what comes next (docs/architecture.md, "Failover"): the
same request again elsewhere when nothing was delivered, a continuation (the delivered pieces go
along) when something was, or the end: after ``max_attempts`` sends, or at once for a request that
crashed ``POISON_CRASHES`` replicas.

With a store that outlives the process (``--store sqlite`` or ``redis://``), a ``RecordKeeper``
beside the registry writes each completion's record when it goes downstream and when it ends, its
live log per delivered batch (Redis), and answers the lookups that miss memory (``find``) from the
store (docs/store.md).
"""

from __future__ import annotations

import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Callable

from openai_stream_protocol import Chunk, Continuation, Piece

from .backend import DownstreamRequest
from .encoded_size import request_nbytes
from .errors import ApiError, Overloaded, TooManyRequests, UpstreamError, UpstreamTimeout
from .gateway.owner import visible
from .metrics import Metrics
from .settings import Settings
from .state import ByteLedger, Limits, Outcome, Status, StreamState
from .store.keeper import RecordKeeper

logger = logging.getLogger(__name__)

ADMIT_FRACTION = 0.75
"""New requests are refused while completions hold more than this share of ``max_total_bytes``.

The rest is headroom for the requests already admitted to grow into: refusing a new request (503,
the SDK retries it) is cheaper for everyone than failing one that is half streamed, which happens
only when those in flight outgrow the whole bound.
"""


POISON_CRASHES = 2
"""A request whose attempts were in flight on this many replicas when they died is failed and never sent again."""

Resend = Callable[[StreamState, DownstreamRequest], None]
"""Sends a next attempt (the app runs ``Dispatcher.resend`` for it: it may wait for a live replica)."""


class Attempt:
    """How a completion went downstream, this time: the registry's record, kept on the state (``StreamState.attempt``).

    A slotted object on the state rather than a table here: ``deliver`` reads ``wire_id`` once per chunk.
    """

    __slots__ = (
        "wire_id",
        "number",
        "request",
        "submitted",
        "sent_at",
        "start_pieces",
        "crashes",
        "avoid",
        "continued_tokens",
        "continued_reasoning",
        "last_error",
    )

    def __init__(self, request_id: str) -> None:
        self.wire_id = request_id
        """The id the node answers under: the completion id, then ``<id>~<n>`` after the n-th re-send, so
        that a late chunk of an earlier attempt (a dead or restarted replica) never mixes in."""
        self.number = 0
        """0 for the first send, n for the n-th re-send."""
        self.request: DownstreamRequest | None = None
        """What was sent, kept while in flight so that it can be re-sent when its replica dies unanswered."""
        self.submitted = False
        """Set once the request went downstream: only those are sent a ``cancel`` when they end early."""
        self.sent_at: float | None = None
        """When this attempt went downstream (``attempt_timeout_s`` counts from it)."""
        self.start_pieces = 0
        """Pieces the client had when this attempt started: more means it has answered."""
        self.crashes = 0
        """Replicas that died (or went silent) while holding this request."""
        self.avoid: list[str] = []
        """Replicas that failed this request: the next attempt goes elsewhere if it can."""
        self.continued_tokens = 0
        """Completion tokens delivered before the attempt that continues the answer (the server's count): the node counts
        only its own, the usage adds these."""
        self.continued_reasoning = 0
        """The reasoning tokens among ``continued_tokens``."""
        self.last_error: ApiError | None = None
        """Why the last attempt failed: what the client gets if no next attempt can be sent."""


class StreamRegistry:
    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        on_cancel: Callable[[str], None],
        on_release: Callable[[str, bool], None] | None = None,
        keeper: RecordKeeper | None = None,
        on_failed: Callable[[str], str | None] | None = None,
        can_retry: Callable[..., bool] | None = None,
    ) -> None:
        self.settings = settings
        self.keeper = keeper
        """The store's side (None with ``--store memory``: nothing outlives the process)."""
        self._live_logs = keeper is not None and keeper.live_logs
        self.metrics = metrics
        self._on_cancel = on_cancel
        self._on_release = on_release
        self._on_failed = on_failed
        """The backend's ``replica_failed``: the replica holding a wire id failed it (busy, timed out)."""
        self._can_retry = can_retry
        """The backend's ``can_retry``: another live replica could take a wire id's request."""
        self.on_resend: Resend | None = None
        """Sends each next attempt (set by the app); without it a request that needs one fails."""
        self._retried: dict[str, StreamState] = {}
        """Wire id of a re-sent request (``<id>~<n>``) -> its state; the first attempt's id is the state's own."""
        self._limits = Limits(settings.max_buffered_chunks, settings.max_completion_bytes)
        self.active: dict[str, StreamState] = {}
        self.retained: OrderedDict[str, StreamState] = OrderedDict()
        self._ledger = ByteLedger()
        self._max_total_bytes = settings.max_total_bytes or sys.maxsize  # 0: no bound
        self._admit_bytes = int(self._max_total_bytes * ADMIT_FRACTION)
        metrics.held_bytes.set_function(lambda: self._ledger.nbytes)  # read when /metrics renders, not per chunk
        self.last_chunk_at: float | None = None

    @property
    def held_bytes(self) -> int:
        """Bytes held by every completion in flight and retained (``StreamState.held_bytes`` summed)."""
        return self._ledger.nbytes

    def open(self, request_id: str, model: str, prompt_tokens: int, surface: str) -> StreamState:
        """A new completion in flight, opened by ``surface`` (the name its metrics and log line carry)."""
        if len(self.active) >= self.settings.max_active_requests:
            raise TooManyRequests(f"{len(self.active)} requests in flight (limit {self.settings.max_active_requests})")
        if self._ledger.nbytes >= self._admit_bytes:
            self._make_room()
        state = StreamState(request_id, model, surface, prompt_tokens=prompt_tokens, limits=self._limits, ledger=self._ledger)
        state.attempt = Attempt(request_id)
        self.active[request_id] = state
        self.metrics.active_streams.inc()
        return state

    def sent(self, state: StreamState, request: DownstreamRequest) -> None:
        """``request`` went downstream for ``state``: it is cancelled there if it ends early, re-sent if its replica dies."""
        attempt = state.attempt
        attempt.submitted = True
        attempt.sent_at = time.monotonic()
        if attempt.number == 0:  # later attempts are built from the first request (``_next_attempt``)
            attempt.request = request
            self._ledger.nbytes += request_nbytes(request)  # held while in flight (docs/architecture.md, "Memory bounds")
        if self.keeper is not None and attempt.number == 0:
            self.keeper.opened(state)

    def get(self, request_id: str) -> StreamState | None:
        return self.active.get(request_id) or self.retained.get(request_id)

    async def find(self, request_id: str) -> StreamState | None:
        """``get``, else the store's record of it (read-only, or following another process's live completion).

        Raises the keeper's 503 errors when the store cannot answer (docs/store.md, "Failures").
        """
        state = self.active.get(request_id) or self.retained.get(request_id)
        if state is None and self.keeper is not None:
            state = await self.keeper.lookup(request_id)
        return state if state is None or visible(state) else None  # another API key's: not there (docs/team.md)

    # -- from the backend --------------------------------------------------

    def deliver(self, chunks: list[Chunk]) -> None:
        """Route a batch of chunks to their requests (called on the loop thread)."""
        now = time.monotonic()
        self.last_chunk_at = now
        metrics = self.metrics
        delivered = 0
        active, retained, retried = self.active, self.retained, self._retried
        # A shared store gets each completion's new pieces once per delivered batch (docs/store.md).
        touched: dict[StreamState, int] | None = {} if self._live_logs else None
        for chunk in chunks:
            rid = chunk.request_id
            # A chunk names its request: one without an id (a legacy reply) is named by the backend, which
            # alone knows which replica it came from (docs/architecture.md, "Legacy replies (no seq)").
            state = None if rid is None else active.get(rid) or retained.get(rid) or (retried.get(rid) if retried else None)
            if state is None:
                metrics.dropped_chunks.labels("unknown").inc()
                continue
            if state.attempt.wire_id != rid:
                # An earlier attempt's chunk (its replica died, the request was re-sent): never mixed in.
                metrics.dropped_chunks.labels("stale").inc()
                continue
            if chunk.error_code is not None and chunk.is_busy:
                self._turned_away(state, chunk)  # the node said "busy": another replica, not an error
                continue
            previous = state.last_chunk_at
            pieces = state.log.pieces
            logged = len(pieces)
            outcome = state.accept(chunk, now)
            if outcome is Outcome.DELIVERED:
                # Per chunk, a Counter.inc costs ~0.5 us and a Histogram.observe ~1.2 us (benchmarks/README.md):
                # count once per batch, and observe a gap once per stream per batch (one batch is one arrival).
                # One chunk in order may release held ones after it: count everything it appended.
                delivered += len(pieces) - logged
                if touched is not None and state not in touched:
                    touched[state] = logged
                if previous is not None:
                    if previous != now:
                        metrics.inter_chunk.observe(now - previous)
                elif state.first_chunk_at is not None:
                    metrics.time_to_first_chunk.observe(state.first_chunk_at - state.started_at)
            elif outcome is Outcome.REORDERED:
                metrics.reordered_chunks.inc()
            else:
                metrics.dropped_chunks.labels(outcome.value).inc()
            if state.status is not Status.IN_PROGRESS and state.request_id in active:
                self._ended(state)
        if delivered:
            metrics.chunks.inc(delivered)
        if touched:
            self.keeper.delivered(touched)  # type: ignore[union-attr]  # touched is only made with a keeper
        if self._ledger.nbytes > self._max_total_bytes:
            self._reclaim()

    # -- from the HTTP layer -----------------------------------------------

    def cancel(self, request_id: str) -> bool:
        """The client is gone or asked to cancel: end the request and tell the node."""
        state = self.active.get(request_id)
        if state is None or not state.cancel():
            return False
        self.metrics.cancellations.inc()
        self._ended(state)
        return True

    async def cancel_anywhere(self, request_id: str) -> bool:
        """``cancel`` here, or ask the server process that runs it (a shared store) and wait briefly for its end."""
        if self.cancel(request_id):
            return True
        return self.keeper is not None and await self.keeper.cancel_elsewhere(request_id)

    def delete(self, request_id: str) -> bool:
        """Forget a completion: cancel it if in flight (a ``cancel`` goes downstream), then drop it, here and in the
        store (whose owner process, on a shared store, forgets it too); False if it was not in memory."""
        self.cancel(request_id)
        if self.keeper is not None:
            self.keeper.discarded(request_id)
        state = self.retained.pop(request_id, None)
        if state is None:
            return False
        self._forget(state)
        return True

    def fail(self, state: StreamState, error: ApiError) -> None:
        if state.request_id in self.active:
            state.fail(error)
            self._ended(state)

    def orphaned(self, wire_ids: list[str], error: ApiError, replica_id: str | None = None) -> list[StreamState]:
        """Their replica died (or went silent): each request goes on elsewhere, or ends; returns those sent on.

        One that has received nothing yet is sent again as it was, and the client never knows; one that
        has is continued: the pieces it already delivered go along, and a replica that can continue answers
        only the rest (docs/architecture.md, "Failover"). The next attempt is decided here, at once, under a
        new wire id, so that nothing the dead attempt still sends can mix in.
        """
        resent = []
        for wire_id in wire_ids:
            state = self.active.get(wire_id) or self._retried.get(wire_id)
            if state is None or state.done or state.attempt.wire_id != wire_id:
                continue
            state.attempt.crashes += 1
            if self._try_again(state, error, replica_id):
                resent.append(state)
        return resent

    def resend_failed(self, state: StreamState, error: ApiError) -> None:
        """The next attempt could not be sent (no replica, or none that can continue): the last failure ends it."""
        attempt = state.attempt
        self.fail(state, attempt.last_error if attempt.start_pieces and attempt.last_error is not None else error)

    def _turned_away(self, state: StreamState, chunk: Chunk) -> None:
        """The node answered busy: try another replica if there is one (its failure), else end with 503."""
        attempt = state.attempt
        busy = Overloaded(chunk.error or "the model is busy; retry later")
        elsewhere = self._can_retry is not None and self._can_retry(attempt.wire_id, continuing=len(state.log.pieces) > 0)
        failed_on = self._on_failed(attempt.wire_id) if self._on_failed is not None else None
        if elsewhere:
            self._try_again(state, busy, failed_on)
        else:
            self.fail(state, busy)

    def _try_again(self, state: StreamState, error: ApiError, failed_on: str | None) -> bool:
        """After a failed attempt: the next one (handed to ``on_resend``), or the end; True if one was sent on."""
        attempt = state.attempt
        attempt.last_error = error
        if failed_on is not None:
            attempt.avoid.append(failed_on)
        if attempt.crashes >= POISON_CRASHES:
            self.metrics.poison_requests.inc()
            logger.error("completion %s crashed %d model replicas: not sent again", state.request_id, attempt.crashes)
            self.fail(state, UpstreamError(f"the request crashed {attempt.crashes} model replicas"))
            return False
        request = self._next_attempt(state, failed_on)
        if request is None or self.on_resend is None:
            self.fail(state, error)
            return False
        self.on_resend(state, request)
        return True

    def _next_attempt(self, state: StreamState, failed_on: str | None) -> DownstreamRequest | None:
        """The next attempt under a new wire id (None: none is left, or nothing to build it from)."""
        attempt = state.attempt
        request = attempt.request
        if request is None or state.done or attempt.number + 1 >= self.settings.max_attempts:
            return None
        if attempt.number:
            self._retried.pop(attempt.wire_id, None)
        attempt.number += 1
        attempt.wire_id = wire_id = f"{state.request_id}~{attempt.number}"
        self._retried[wire_id] = state
        state.new_attempt()  # chunks the failed attempt sent early are dropped: the next one numbers on from the log
        log = state.log
        attempt.start_pieces = delivered = len(log.pieces)
        attempt.sent_at = None
        metadata = {**request.metadata, "request_id": wire_id, "session_id": wire_id}
        logger.info(
            "completion %s: attempt %d, %s%s",
            state.request_id,
            attempt.number + 1,
            f"continuing after {delivered} pieces" if delivered else "sent again",
            f" ({failed_on} failed it)" if failed_on else "",
        )
        if delivered:
            calls, reasoning = log.tool_calls, log.reasoning
            pieces = [Piece(text, calls.get(i), i in reasoning) for i, text in enumerate(log.pieces)]
            metadata.update(Continuation(tuple(pieces)).to_metadata())
            attempt.continued_tokens, attempt.continued_reasoning = log.counted_tokens, log.counted_reasoning
            self.metrics.continuations.inc()
        else:
            self.metrics.retries.inc()
        return DownstreamRequest(
            wire_id, request.texts, metadata, retry_of=failed_on, avoid=tuple(attempt.avoid), continuing=delivered > 0
        )

    def fail_all(self, error: ApiError) -> None:
        """Shutdown: every in-flight request ends with ``error``."""
        for state in list(self.active.values()):
            self.fail(state, error)

    def sweep(self) -> None:
        """Apply timeouts to requests in flight and expire retained ones."""
        now = time.monotonic()
        s = self.settings
        attempt_timeout = s.attempt_timeout_s if self._can_retry is not None and self.on_resend is not None else 0.0
        for state in list(self.active.values()):
            if state.check_deadlines(now, s.first_chunk_timeout_s, s.idle_timeout_s, s.gap_timeout_s):
                if state.timed_out is not None:
                    self.metrics.timeouts.labels(state.timed_out).inc()
                self._ended(state)
            elif attempt_timeout:
                self._check_attempt(state, now, attempt_timeout)
        while self.retained:
            oldest = next(iter(self.retained.values()))
            if oldest.ended_at is not None and now - oldest.ended_at <= s.retention_s:
                break
            self._evict_oldest()

    def _check_attempt(self, state: StreamState, now: float, timeout_s: float) -> None:
        """Nothing from this attempt's replica for ``timeout_s`` since it was sent: try another, if another could take it."""
        attempt = state.attempt
        sent_at = attempt.sent_at
        if sent_at is None or now - sent_at <= timeout_s or attempt.number + 1 >= self.settings.max_attempts:
            return
        if len(state.log.pieces) > attempt.start_pieces or state.reorder.held:
            return  # it has answered
        continuing = attempt.start_pieces > 0
        assert self._can_retry is not None
        if not self._can_retry(attempt.wire_id, continuing=continuing):
            return  # nobody else: keep waiting (the first-chunk and idle timeouts still apply)
        self.metrics.timeouts.labels("attempt").inc()
        failed_on = self._on_failed(attempt.wire_id) if self._on_failed is not None else None
        self._try_again(state, UpstreamTimeout(f"no answer from the model replica within {timeout_s:g} s"), failed_on)

    # -- bookkeeping -------------------------------------------------------

    def _ended(self, state: StreamState) -> None:
        attempt = state.attempt
        if attempt.continued_tokens and state.status is Status.COMPLETED:
            # The continuing node counted only its own tokens; the client's usage is the whole answer's.
            log = state.log
            if log.completion_tokens is not None:
                log.completion_tokens += attempt.continued_tokens
            if log.reasoning_tokens is not None:
                log.reasoning_tokens += attempt.continued_reasoning
        del self.active[state.request_id]
        self.metrics.active_streams.dec()
        self.metrics.completions.labels(state.status.value, state.surface).inc()
        if attempt.submitted and (
            state.status is Status.CANCELLED or (state.status is Status.FAILED and state.log.finish_reason != "error")
        ):
            # The node may still be working on it: stop it (docs/architecture.md, "Limits and failure behaviour").
            # One never submitted (submit raised) is unknown to the nodes: nothing to stop.
            self._on_cancel(attempt.wire_id)
        if self._on_release is not None and attempt.submitted:
            self._on_release(attempt.wire_id, state.status is Status.COMPLETED)
        if attempt.number:
            self._retried.pop(attempt.wire_id, None)
        if attempt.request is not None:
            self._ledger.nbytes -= request_nbytes(attempt.request)
        attempt.request = None
        if self.keeper is not None and attempt.submitted:
            self.keeper.ended(state)
        if state.status is Status.FAILED and state.error is not None:
            self.metrics.errors.labels(state.error.code or state.error.error_type).inc()
        self._log(state)
        self.retained[state.request_id] = state
        ledger = self._ledger
        ledger.retained_text += state.log.nbytes
        s = self.settings
        while self.retained and (len(self.retained) > s.max_retained or ledger.retained_text > s.max_retained_bytes):
            self._evict_oldest()

    def _evict_oldest(self) -> None:
        _, state = self.retained.popitem(last=False)
        self._forget(state)

    def _forget(self, state: StreamState) -> None:
        """A retained completion leaves: what it held leaves the ledger."""
        self._ledger.retained_text -= state.log.nbytes
        self._ledger.nbytes -= state.held_bytes

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` that a request holds before it has a completion (its body, read and parsed), making room
        first; 503 when the total would reach ``ADMIT_FRACTION`` of the bound (docs/architecture.md, "Admission")."""
        if self._ledger.nbytes + nbytes >= self._admit_bytes:
            self._make_room(nbytes)
        self._ledger.nbytes += nbytes

    def unreserve(self, nbytes: int) -> None:
        """Bytes ``reserve`` counted are no longer held."""
        self._ledger.nbytes -= nbytes

    def _make_room(self, nbytes: int = 0) -> None:
        """Before a request of ``nbytes``, past ``ADMIT_FRACTION`` of the bound: evict retained, oldest first, else refuse."""
        ledger, admit = self._ledger, self._admit_bytes
        while self.retained and ledger.nbytes + nbytes >= admit:
            self._evict_oldest()
        if ledger.nbytes + nbytes >= admit:
            raise Overloaded(
                f"the server holds {ledger.nbytes} bytes, near the limit of {self._max_total_bytes}; try again shortly"
            )

    def _reclaim(self) -> None:
        """Over ``max_total_bytes``: evict retained completions oldest first, then fail the largest in flight.

        Scans the requests in flight, but only when the bound is crossed (an overload), never per chunk.
        The one failed gets an error event (or 503 before its headers) and its node a ``cancel``; its
        text is then evicted like any retained completion while the total is still over the bound.
        """
        ledger, limit = self._ledger, self._max_total_bytes
        while self.retained and ledger.nbytes > limit:
            self._evict_oldest()
        for _ in range(len(self.active)):
            if ledger.nbytes <= limit or not self.active:
                break
            largest = max(self.active.values(), key=_held_bytes)
            self.fail(
                largest,
                Overloaded(
                    f"the server holds more than {limit} bytes over all completions; "
                    f"this one, the largest in flight ({largest.held_bytes} bytes), was ended"
                ),
            )
            while self.retained and ledger.nbytes > limit:
                self._evict_oldest()

    def _log(self, state: StreamState) -> None:
        ttfc = "-" if state.first_chunk_at is None else f"{(state.first_chunk_at - state.started_at) * 1000:.1f}ms"
        duration = (state.ended_at or time.monotonic()) - state.started_at
        # model and error text come from the client or the node: %r keeps a line break in them from
        # starting a forged log line (docs/architecture.md, "Limits and failure behaviour").
        logger.info(
            "completion %s surface=%s model=%r%s%s status=%s finish_reason=%s chunks=%d ttfc=%s duration=%.3fs%s",
            state.request_id,
            state.surface,
            state.model,
            "" if state.owner is None else f" key={state.owner!r}",
            "" if state.service_tier is None else f" tier={state.service_tier}",
            state.status.value,
            state.log.finish_reason,
            len(state.log),
            ttfc,
            duration,
            f" error={state.error.message!r}" if state.error else "",
        )


def _held_bytes(state: StreamState) -> int:
    return state.held_bytes
