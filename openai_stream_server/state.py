"""Per-completion stream state: the lifecycle of one completion, and the parts it is made of.

One ``StreamState`` per completion, on the event-loop thread only. Chunks go in through
``accept`` in any order. Its parts, each with one job (docs/architecture.md, "Room 2: stream state"):

- ``log`` (``answer_log.AnswerLog``): the in-order pieces, the tool-call deltas, the finish and
  usage: what every surface renders, and what a reattaching client reads from;
- ``reorder`` (``reorder.ReorderBuffer``): chunks that came early, until the gap fills;
- ``surface_data`` (``SurfaceData``): what the surface that opened it keeps to render it again;
- ``attempt`` (``registry.Attempt``): how it went downstream, written by the registry only;

and, here, the lifecycle: status, error, timeouts and the readers waiting. Readers never get a
queue of their own: each keeps a cursor into ``log.pieces`` and waits (``wait``), so a slow reader
costs no memory and gets everything pending in one wake-up (coalesced).

Bytes: each part knows what it holds (``AnswerLog.held_bytes``, ``ReorderBuffer.nbytes``,
``SurfaceData.nbytes``); ``held_bytes`` is their sum, and the one ``ByteLedger`` the sum over every
completion, kept up to date by the same changes (docs/architecture.md, "Memory bounds").
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from openai_stream_protocol import Chunk, Part, ToolCall

from .answer_log import LOGGED_CHUNK_OVERHEAD_BYTES, AnswerLog, utf8_len
from .errors import ApiError, UpstreamError, UpstreamTimeout
from .reorder import HELD_CHUNK_OVERHEAD_BYTES, ReorderBuffer, held_cost

if TYPE_CHECKING:
    from .registry import Attempt

__all__ = [
    "HELD_CHUNK_OVERHEAD_BYTES",
    "LOGGED_CHUNK_OVERHEAD_BYTES",
    "ByteLedger",
    "Limits",
    "Outcome",
    "Status",
    "StreamState",
    "SurfaceData",
]


class Status(enum.Enum):
    IN_PROGRESS = "in_progress"  # waiting for or receiving chunks
    COMPLETED = "completed"  # finish marker received and every seq before it
    CANCELLED = "cancelled"  # the client went away or asked to cancel
    FAILED = "failed"  # an error ended it: node error, timeout, gap, shutdown


class Outcome(enum.Enum):
    DELIVERED = "delivered"  # in order, appended to the log
    REORDERED = "reordered"  # early, held until the gap fills
    DUPLICATE = "duplicate"  # a seq already seen, dropped
    LATE = "late"  # the request had already ended, dropped
    OVERFLOW = "overflow"  # the request's buffer was full; it failed


class ByteLedger:
    """The one count of bytes held over many completions (in flight and retained); the registry keeps one.

    Every change to what a completion's parts hold is added here as it happens, so the registry knows
    the total without scanning its completions on the hot path (one attribute update per chunk).
    """

    __slots__ = ("nbytes", "retained_text")

    def __init__(self) -> None:
        self.nbytes = 0
        """Everything the completions hold (``StreamState.held_bytes`` summed): ``max_total_bytes`` bounds it."""
        self.retained_text = 0
        """The answer text of the retained completions (``AnswerLog.nbytes`` summed): ``max_retained_bytes``
        bounds it. Part of ``nbytes`` already: the registry adds it when it retains a completion."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_buffered_chunks: int = 4096
    max_completion_bytes: int = 16 * 1024 * 1024


class SurfaceData:
    """What the surface that opened a completion keeps on it to render or continue it; opaque to the state and registry."""

    __slots__ = ("parts", "context", "nbytes", "context_nbytes")

    def __init__(self) -> None:
        self.parts: list[Part] = []
        """The conversation that was sent, kept for as long as the completion is (in flight or retained) when
        the surface asks (``Dispatcher.submit(keep_parts=True)``): the Responses API continues a conversation
        from it (``previous_response_id``). Empty otherwise."""
        self.context: object | None = None
        """The Responses API: the request fields its response object echoes back."""
        self.nbytes = 0
        """What ``parts`` and ``context`` hold for the byte limits: the parts' text plus ``LOGGED_CHUNK_OVERHEAD_BYTES``
        each, and ``context_nbytes``."""
        self.context_nbytes = 0
        """What ``context`` holds, in encoded bytes, as the surface counted it (``StreamState.keep_context``)."""


class StreamState:
    """One completion in flight or retained.

    ``__slots__``: every chunk reads and writes a dozen of these attributes. Past 30 attributes
    CPython 3.11 stops sharing an instance dict's keys and its attribute access gets slower; at 33
    (the surface, tool-call and Responses fields) the chunk path cost ~1.7 us more per chunk
    (1,000 streams x 30 steps through ``registry.deliver`` and ``chunk_events``: 6.5 -> 8.2 us),
    which slots take back (docs/architecture.md, "Facts measured"). The parts have slots too.
    """

    __slots__ = (
        # what it is
        "request_id",
        "model",
        "created",
        "surface",
        "owner",
        "service_tier",
        "limits",
        # its parts
        "log",
        "reorder",
        "surface_data",
        "attempt",
        "_ledger",
        # its lifecycle
        "status",
        "error",
        "timed_out",
        "started_at",
        "first_chunk_at",
        "last_chunk_at",
        "ended_at",
        "_waiters",
    )

    attempt: Attempt
    """Set by ``StreamRegistry.open``, written by the registry only: a state made outside a registry has none."""

    def __init__(
        self,
        request_id: str,
        model: str,
        surface: str,
        *,
        prompt_tokens: int = 0,
        limits: Limits = Limits(),
        created: int | None = None,
        ledger: ByteLedger | None = None,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.surface = surface
        """The API surface that opened it (``api/``): a label for metrics and the log line, and which surface may read it."""
        self.owner: str | None = None
        """The name of the API key that made it, with a key file (``gateway/owner.py``): only that key may read it."""
        self.service_tier: str | None = None
        """The tier it was queued at (``gateway/queue.py``), which its answers name; None: it asked none and no queue ran."""
        self.limits = limits
        self.log = AnswerLog(prompt_tokens)
        self.reorder = ReorderBuffer()
        self.surface_data = SurfaceData()
        self._ledger = ByteLedger() if ledger is None else ledger
        self.status = Status.IN_PROGRESS
        self.error: ApiError | None = None
        self.timed_out: str | None = None
        """Which timeout ended it, if one did: ``first_chunk``, ``idle`` or ``gap`` (the ``oss_timeouts`` label)."""
        self.started_at = time.monotonic()
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None
        self.ended_at: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        """Subscribers parked in ``wait``; the first change after they park wakes them all, once (``_wake``).

        Bare futures rather than an ``asyncio.Event``: its ``set`` / ``clear`` / ``wait`` (the loop lookup,
        the ``try``/``finally`` list removal) cost ~1.4 us per SSE event in a py-spy profile of 1,000 streams
        stepped together, where the server spent ~31 us per event in all (benchmarks/README.md, "Step mode").
        """

    # -- the lifecycle -------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.status is not Status.IN_PROGRESS

    @property
    def received_any(self) -> bool:
        """A chunk of this attempt arrived (delivered or held): re-sending it could stream twice."""
        return self.first_chunk_at is not None or bool(self.reorder.held)

    @property
    def held_bytes(self) -> int:
        """What this completion holds for the byte limits: the log, the chunks held back and the kept conversation."""
        return self.log.held_bytes + self.reorder.nbytes + self.surface_data.nbytes

    async def wait(self, cursor: int, timeout_s: float | None = None) -> None:
        """Return once there is more than ``cursor`` pieces, the stream ended, or ``timeout_s`` passed."""
        while cursor >= len(self.log.pieces) and self.status is Status.IN_PROGRESS:
            if timeout_s is None:
                await self._park()
            else:
                # The waiter is listed before anything else runs: ``wait_for`` on a coroutine would start it as a task
                # of its own, after an end already scheduled, which would then wake nobody (a stream held its headers
                # for the whole grace period; tests/unit/test_state_wait_race.py).
                waiter = self._waiter()
                try:
                    await asyncio.wait_for(waiter, timeout_s)
                except TimeoutError:
                    return
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    async def wait_done(self) -> None:
        while self.status is Status.IN_PROGRESS:
            await self._park()

    def _waiter(self) -> asyncio.Future[None]:
        """A future the next change resolves (``_wake``), listed at once."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        return waiter

    async def _park(self) -> None:
        waiter = self._waiter()
        try:
            await waiter
        except BaseException:  # cancelled (the client left, a timeout): not woken, so still listed
            if waiter in self._waiters:
                self._waiters.remove(waiter)
            raise

    def _wake(self) -> None:
        waiters = self._waiters
        self._waiters = []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def calls(self) -> list[ToolCall]:
        """The tool calls so far, whole; a call the node named no id gets ``fallback_call_id`` of this completion."""
        return self.log.calls(self.request_id)

    # -- writing -------------------------------------------------------------

    def keep_parts(self, parts: Iterable[Part]) -> None:
        """Keep the conversation that was sent (``parts``), counting its bytes like the answer's."""
        kept = self.surface_data
        kept.parts = list(parts)
        size = sum(utf8_len(part.content) + LOGGED_CHUNK_OVERHEAD_BYTES for part in kept.parts) + kept.context_nbytes
        self._ledger.nbytes += size - kept.nbytes
        kept.nbytes = size

    def keep_context(self, context: object | None, nbytes: int = 0) -> None:
        """Keep what the surface renders the completion with again (``surface_data.context``), counting ``nbytes``: its
        size in encoded form, not as Python objects (docs/architecture.md, "Memory bounds")."""
        kept = self.surface_data
        kept.context = context
        self._ledger.nbytes += nbytes - kept.context_nbytes
        kept.nbytes += nbytes - kept.context_nbytes
        kept.context_nbytes = nbytes

    def accept(self, chunk: Chunk, now: float) -> Outcome:
        """Take one chunk from the node, in whatever order it came."""
        if self.status is not Status.IN_PROGRESS:
            return Outcome.LATE
        seq = chunk.seq
        if seq is None:  # a legacy reply: the whole answer at once
            self._append(chunk, now)
            if self.status is Status.IN_PROGRESS:
                self._finish("stop")
            return Outcome.DELIVERED
        next_seq = len(self.log.pieces)
        reorder = self.reorder
        if seq != next_seq:
            return self._early(chunk, seq, next_seq, now)
        # In order (the common case): the buffer holds nothing at or before ``seq``, nor a finish before it.
        self._append(chunk, now)
        if reorder.held:
            while self.status is Status.IN_PROGRESS:
                following = reorder.take(len(self.log.pieces))
                if following is None:
                    break
                self._ledger.nbytes -= held_cost(following)
                self._append(following, now)
            reorder.gap_since = now if reorder.held else None
        return Outcome.DELIVERED

    def _early(self, chunk: Chunk, seq: int, next_seq: int, now: float) -> Outcome:
        """A chunk that is not the next one: a duplicate, or held until its turn."""
        reorder = self.reorder
        if reorder.seen(seq, next_seq):
            return Outcome.DUPLICATE
        if chunk.fin:
            reorder.fin_seq = seq
        if len(reorder.held) >= self.limits.max_buffered_chunks:
            self.fail(UpstreamError(f"more than {self.limits.max_buffered_chunks} chunks waiting for seq {next_seq}"))
            return Outcome.OVERFLOW
        cost = held_cost(chunk)
        if self.held_bytes + cost > self.limits.max_completion_bytes:
            self.fail(self._too_large())
            return Outcome.OVERFLOW
        reorder.hold(chunk, seq, cost, now)
        self._ledger.nbytes += cost
        return Outcome.REORDERED

    def _append(self, chunk: Chunk, now: float) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        self.last_chunk_at = now
        log = self.log
        size = log.append(chunk.text, chunk.tool_call, chunk.sent_at, chunk.reasoning) + LOGGED_CHUNK_OVERHEAD_BYTES
        self._ledger.nbytes += size
        if self._waiters:  # the first chunk of a batch wakes each subscriber; the rest find none parked
            self._wake()
        # ``held_bytes``, written out: this runs once per chunk.
        held = log.nbytes + LOGGED_CHUNK_OVERHEAD_BYTES * len(log.pieces) + self.reorder.nbytes + self.surface_data.nbytes
        if held > self.limits.max_completion_bytes:
            self.fail(self._too_large())
            return
        if chunk.prompt_tokens is not None:
            log.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            log.completion_tokens = chunk.completion_tokens
        if chunk.fin:
            if chunk.reasoning_tokens is not None:
                log.reasoning_tokens = chunk.reasoning_tokens
            if chunk.finish_reason == "error":
                log.finish_reason = "error"
                self.fail(UpstreamError(chunk.error or "the model node reported an error"))
            else:
                log.stop_sequence = chunk.stop_sequence
                self._finish(chunk.finish_reason or "stop")

    def _too_large(self) -> ApiError:
        return UpstreamError(
            f"the answer exceeded {self.limits.max_completion_bytes} bytes "
            f"(its text plus {LOGGED_CHUNK_OVERHEAD_BYTES} per chunk, {HELD_CHUNK_OVERHEAD_BYTES} per chunk held for reordering)",
            code="completion_too_large",
        )

    def _finish(self, finish_reason: str) -> None:
        self.log.finish_reason = finish_reason
        self._end(Status.COMPLETED)

    def fail(self, error: ApiError) -> None:
        if self.done:
            return
        self.error = error
        self._end(Status.FAILED)

    def restore_end(self, status: Status) -> None:
        """End it as a stored record says it ended (``store/snapshot.py``): the record's pieces, finish reason and
        usage were put in the log first. Nothing goes downstream for a completion read back from a store."""
        if not self.done:
            self._end(status)

    def new_attempt(self) -> None:
        """The request goes downstream again (its replica failed): what the failed attempt sent early is dropped, and
        the next one numbers its chunks on from the log (docs/architecture.md, "Failover")."""
        reorder = self.reorder
        if reorder.held:
            self._ledger.nbytes -= reorder.clear()
        reorder.fin_seq = None
        reorder.gap_since = None

    def cancel(self) -> bool:
        """End the request because the client is gone; False if it had already ended."""
        if self.done:
            return False
        self._end(Status.CANCELLED)
        return True

    def _end(self, status: Status) -> None:
        self.status = status
        self.ended_at = time.monotonic()
        if self.reorder.held:
            self._ledger.nbytes -= self.reorder.clear()
        self._wake()

    def check_deadlines(self, now: float, first_chunk_timeout_s: float, idle_timeout_s: float, gap_timeout_s: float) -> bool:
        """Fail the request if a timeout passed; True if it did."""
        if self.done:
            return False
        gap_since = self.reorder.gap_since
        if gap_since is not None and now - gap_since > gap_timeout_s:
            self.timed_out = "gap"
            missing = len(self.log.pieces)
            self.fail(UpstreamError(f"chunk seq {missing} never arrived (waited {gap_timeout_s:g} s)", code="missing_chunk"))
        elif self.first_chunk_at is None and not self.reorder.held:
            if now - self.started_at > first_chunk_timeout_s:
                self.timed_out = "first_chunk"
                self.fail(UpstreamTimeout(f"no answer from the model node within {first_chunk_timeout_s:g} s"))
        elif self.last_chunk_at is not None and now - self.last_chunk_at > idle_timeout_s:
            self.timed_out = "idle"
            self.fail(UpstreamTimeout(f"the model node went silent for {idle_timeout_s:g} s"))
        return self.done
