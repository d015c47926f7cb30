"""Per-request stream state: reorder buffer, finish marker, usage, log, subscribers.

One ``StreamState`` per completion. Chunks go in through ``accept`` in any
order; ``pieces`` holds the in-order texts (``pieces[i]`` is the text of
``seq == i``), which is also the log a reattaching client reads from.
Subscribers never get a queue of their own: each keeps a cursor into
``pieces`` and waits for ``changed``, so a slow reader costs no memory and
gets everything pending in one wake-up (coalesced).
Runs on the event loop thread only.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Iterable
from dataclasses import dataclass

from openai_stream_protocol import Chunk, Part, ToolCall, ToolCallDelta

from .answer_log import fallback_call_id
from .backend import DownstreamRequest
from .errors import ChatCompletionError, UpstreamError, UpstreamTimeout


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


LOGGED_CHUNK_OVERHEAD_BYTES = 64
"""What one chunk in ``pieces`` costs beyond its text's UTF-8 bytes, for the byte limits.

Measured on CPython 3.11 (tracemalloc): a short text is a str of 49 bytes plus its length, and the
list slot holding it is 8; an empty text is the shared ``""`` and costs only the slot. Counting every
chunk as at least 64 bytes makes a node that floods empty (or one-byte) chunks reach
``max_completion_bytes`` rather than grow ``pieces`` without bound (docs/architecture.md, "Limits and
failure behaviour").
"""

HELD_CHUNK_OVERHEAD_BYTES = 320
"""What one chunk held back for reordering (``_pending``) costs beyond its text's UTF-8 bytes.

Measured as above: about 270 bytes for an empty chunk (the ``Chunk`` object, its request id string,
the int key and the dict entry), rounded up. Held chunks count towards ``max_completion_bytes`` too,
so a node that sends ``seq`` far ahead (never ``seq`` 0) ends its request instead of filling memory.
"""


class ByteLedger:
    """Bytes held over many completions (in flight and retained), kept up to date by each ``StreamState``.

    One shared mutable count: adding to it costs one attribute update per chunk, so the registry
    knows the total without scanning its completions on the hot path.
    """

    __slots__ = ("nbytes",)

    def __init__(self) -> None:
        self.nbytes = 0


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode())


@dataclass(frozen=True, slots=True)
class Limits:
    max_buffered_chunks: int = 4096
    max_completion_bytes: int = 16 * 1024 * 1024


class StreamState:
    """One completion in flight or retained.

    ``__slots__``: every chunk reads and writes a dozen of these attributes. Past 30 attributes
    CPython 3.11 stops sharing an instance dict's keys and its attribute access gets slower; at 33
    (the surface, tool-call and Responses fields) the chunk path cost ~1.7 us more per chunk
    (1,000 streams x 30 steps through ``registry.deliver`` and ``chunk_events``: 6.5 -> 8.2 us),
    which slots take back (docs/architecture.md, "Facts measured").
    """

    __slots__ = (
        "request_id",
        "model",
        "created",
        "limits",
        "status",
        "surface",
        "pieces",
        "sent_at",
        "tool_calls",
        "nbytes",
        "held_bytes",
        "submitted",
        "request",
        "parts",
        "context",
        "wire_id",
        "attempt",
        "_ledger",
        "_pending_bytes",
        "finish_reason",
        "stop_sequence",
        "error",
        "timed_out",
        "prompt_tokens",
        "completion_tokens",
        "counted_tokens",
        "started_at",
        "first_chunk_at",
        "last_chunk_at",
        "ended_at",
        "_pending",
        "_fin_seq",
        "_gap_since",
        "_waiters",
    )

    def __init__(
        self,
        request_id: str,
        model: str,
        *,
        prompt_tokens: int = 0,
        limits: Limits = Limits(),
        created: int | None = None,
        ledger: ByteLedger | None = None,
    ) -> None:
        self.request_id = request_id
        self.model = model
        self.created = int(time.time()) if created is None else created
        self.limits = limits
        self.status = Status.IN_PROGRESS
        self.surface = "chat"
        """The API surface that opened it (``api/``): a label for metrics and the log line only."""
        self.pieces: list[str] = []
        self.sent_at: dict[int, float] = {}
        self.tool_calls: dict[int, ToolCallDelta] = {}
        """Piece index -> the tool call that piece belongs to, for pieces that are tool-call argument deltas
        (docs/architecture.md, "Tool calls"); every other piece is answer text. Empty for most answers, so a
        renderer that finds it empty takes the text-only path."""
        """The node's ``sent_at`` per piece, for chunks that carry it (benchmarks: ``relay_sent_at``)."""
        self.nbytes = 0
        """UTF-8 bytes of the answer text in ``pieces``."""
        self.held_bytes = 0
        """What this completion holds for the byte limits: text bytes plus a per-chunk overhead, for
        chunks in ``pieces`` and chunks held back (``LOGGED_CHUNK_OVERHEAD_BYTES``, ``HELD_CHUNK_OVERHEAD_BYTES``),
        and the conversation when it is kept (``keep_parts``)."""
        self.submitted = False
        """Set once the request went downstream: only those are sent a ``cancel`` when they end early."""
        self.request: DownstreamRequest | None = None
        """What was sent, kept while in flight so that it can be re-sent when its replica dies unanswered."""
        self.parts: list[Part] = []
        """The conversation that was sent, as parts, kept for as long as the completion is (in flight or
        retained) when the surface asks (``Dispatcher.submit(keep_parts=True)``): the Responses API
        continues a conversation from it (``previous_response_id``). Empty otherwise. Counted in
        ``held_bytes`` (``keep_parts``), so the byte limits see it."""
        self.context: object | None = None
        """Opaque to the state and the registry: what the surface that opened it keeps to render it again
        (the Responses API: the request fields its response object echoes back)."""
        self.wire_id = request_id
        """The id the node answers under: ``request_id``, then ``<request_id>~<n>`` after the n-th re-send, so
        that a late chunk of an earlier attempt (a dead or restarted replica) never mixes in."""
        self.attempt = 0
        self._ledger = ByteLedger() if ledger is None else ledger
        self._pending_bytes = 0
        self.finish_reason: str | None = None
        self.stop_sequence: str | None = None
        """The stop string that ended the answer, when the node's finish chunk names one (``stop_sequence``):
        Anthropic's ``stop_reason: "stop_sequence"``. The text is cut before it; ``finish_reason`` is ``stop``."""
        self.error: ChatCompletionError | None = None
        self.timed_out: str | None = None
        """Which timeout ended it, if one did: ``first_chunk``, ``idle`` or ``gap`` (the ``oss_timeouts`` label)."""
        self.prompt_tokens = prompt_tokens
        self.completion_tokens: int | None = None
        self.counted_tokens = 0
        self.started_at = time.monotonic()
        self.first_chunk_at: float | None = None
        self.last_chunk_at: float | None = None
        self.ended_at: float | None = None
        self._pending: dict[int, Chunk] = {}
        self._fin_seq: int | None = None
        self._gap_since: float | None = None
        self._waiters: list[asyncio.Future[None]] = []
        """Subscribers parked in ``wait``; the first change after they park wakes them all, once (``_wake``).

        Bare futures rather than an ``asyncio.Event``: its ``set`` / ``clear`` / ``wait`` (the loop lookup,
        the ``try``/``finally`` list removal) cost ~1.4 us per SSE event in a py-spy profile of 1,000 streams
        stepped together, where the server spent ~31 us per event in all (benchmarks/README.md, "Step mode").
        """

    # -- reading -----------------------------------------------------------

    @property
    def done(self) -> bool:
        return self.status is not Status.IN_PROGRESS

    @property
    def received_any(self) -> bool:
        """A chunk of this attempt arrived (delivered or held): re-sending it could stream twice."""
        return self.first_chunk_at is not None or bool(self._pending)

    @property
    def text(self) -> str:
        """The answer text: every piece that is not a tool-call delta."""
        if not self.tool_calls:
            return "".join(self.pieces)
        calls = self.tool_calls
        return "".join(piece for i, piece in enumerate(self.pieces) if i not in calls)

    def calls(self) -> list[ToolCall]:
        """The tool calls so far, whole, in index order: id and name from their deltas, arguments joined."""
        found: dict[int, list[str | None]] = {}
        pieces = self.pieces
        for i, delta in sorted(self.tool_calls.items()):
            call = found.setdefault(delta.index, [None, None, ""])
            if call[0] is None and delta.id:
                call[0] = delta.id
            if call[1] is None and delta.name:
                call[1] = delta.name
            call[2] = (call[2] or "") + pieces[i]
        return [
            ToolCall(call_id or fallback_call_id(self.request_id, index), name or "", arguments or "")
            for index, (call_id, name, arguments) in sorted(found.items())
        ]

    def segments(self, start: int, end: int) -> list[tuple[ToolCallDelta | None, str, int]]:
        """Pieces ``start:end`` as runs ``(delta, text, last piece index)``: ``delta`` None for answer text, else
        the call whose argument pieces the run joins.

        Consecutive pieces of the same kind (text, or the same call) are joined, as the renderers coalesce; a
        run's delta carries the call's id and name when the run holds the call's first chunk.
        """
        runs: list[tuple[ToolCallDelta | None, str, int]] = []
        calls, pieces = self.tool_calls, self.pieces
        for i in range(start, end):
            delta = calls.get(i)
            if runs:
                last, text, _ = runs[-1]
                if delta is None and last is None:
                    runs[-1] = (None, text + pieces[i], i)
                    continue
                if delta is not None and last is not None and last.index == delta.index:
                    runs[-1] = (ToolCallDelta(delta.index, last.id or delta.id, last.name or delta.name), text + pieces[i], i)
                    continue
            runs.append((delta, pieces[i], i))
        return runs

    @property
    def usage(self) -> dict[str, int]:
        completion = self.completion_tokens if self.completion_tokens is not None else self.counted_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }

    async def wait(self, cursor: int, timeout_s: float | None = None) -> None:
        """Return once there is more than ``cursor`` pieces, the stream ended, or ``timeout_s`` passed."""
        while cursor >= len(self.pieces) and self.status is Status.IN_PROGRESS:
            if timeout_s is None:
                await self._park()
            else:
                try:
                    await asyncio.wait_for(self._park(), timeout_s)
                except TimeoutError:
                    return

    async def wait_done(self) -> None:
        while self.status is Status.IN_PROGRESS:
            await self._park()

    async def _park(self) -> None:
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
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

    # -- writing -----------------------------------------------------------

    def keep_parts(self, parts: Iterable[Part]) -> None:
        """Keep the conversation that was sent (``parts``), counting its bytes like the answer's."""
        self.parts = list(parts)
        size = sum(_utf8_len(part.content) + LOGGED_CHUNK_OVERHEAD_BYTES for part in self.parts)
        self.held_bytes += size
        self._ledger.nbytes += size

    def accept(self, chunk: Chunk, now: float) -> Outcome:
        """Take one chunk from the node, in whatever order it came."""
        if self.done:
            return Outcome.LATE
        if chunk.seq is None:  # a legacy reply: the whole answer at once
            self._append(chunk, now)
            self._finish("stop")
            return Outcome.DELIVERED
        seq = chunk.seq
        next_seq = len(self.pieces)
        if seq < next_seq or seq in self._pending or (self._fin_seq is not None and seq > self._fin_seq):
            return Outcome.DUPLICATE
        if chunk.fin:
            self._fin_seq = seq
        if seq > next_seq:
            if len(self._pending) >= self.limits.max_buffered_chunks:
                self.fail(UpstreamError(f"more than {self.limits.max_buffered_chunks} chunks waiting for seq {next_seq}"))
                return Outcome.OVERFLOW
            cost = _utf8_len(chunk.text) + HELD_CHUNK_OVERHEAD_BYTES
            if self.held_bytes + cost > self.limits.max_completion_bytes:
                self.fail(self._too_large())
                return Outcome.OVERFLOW
            self._pending[seq] = chunk
            self._pending_bytes += cost
            self.held_bytes += cost
            self._ledger.nbytes += cost
            if self._gap_since is None:
                self._gap_since = now
            return Outcome.REORDERED
        self._append(chunk, now)
        while self._pending and not self.done:
            following = self._pending.pop(len(self.pieces), None)
            if following is None:
                break
            cost = _utf8_len(following.text) + HELD_CHUNK_OVERHEAD_BYTES
            self._pending_bytes -= cost
            self.held_bytes -= cost
            self._ledger.nbytes -= cost
            self._append(following, now)
        self._gap_since = now if self._pending else None
        return Outcome.DELIVERED

    def _append(self, chunk: Chunk, now: float) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = now
        self.last_chunk_at = now
        if chunk.sent_at is not None:
            self.sent_at[len(self.pieces)] = chunk.sent_at
        if chunk.tool_call is not None:
            self.tool_calls[len(self.pieces)] = chunk.tool_call
        text = chunk.text
        self.pieces.append(text)
        size = len(text) if text.isascii() else len(text.encode())
        self.nbytes += size
        size += LOGGED_CHUNK_OVERHEAD_BYTES
        self.held_bytes += size
        self._ledger.nbytes += size
        if text:
            self.counted_tokens += 1
        if self._waiters:  # the first chunk of a batch wakes each subscriber; the rest find none parked
            self._wake()
        if self.held_bytes > self.limits.max_completion_bytes:
            self.fail(self._too_large())
            return
        if chunk.prompt_tokens is not None:
            self.prompt_tokens = chunk.prompt_tokens
        if chunk.completion_tokens is not None:
            self.completion_tokens = chunk.completion_tokens
        if chunk.fin:
            if chunk.finish_reason == "error":
                self.finish_reason = "error"
                self.fail(UpstreamError(chunk.error or "the model node reported an error"))
            else:
                self.stop_sequence = chunk.stop_sequence
                self._finish(chunk.finish_reason or "stop")

    def _too_large(self) -> ChatCompletionError:
        return UpstreamError(
            f"the answer exceeded {self.limits.max_completion_bytes} bytes "
            f"(its text plus {LOGGED_CHUNK_OVERHEAD_BYTES} per chunk, {HELD_CHUNK_OVERHEAD_BYTES} per chunk held for reordering)",
            code="completion_too_large",
        )

    def _finish(self, finish_reason: str) -> None:
        self.finish_reason = finish_reason
        self._end(Status.COMPLETED)

    def fail(self, error: ChatCompletionError) -> None:
        if self.done:
            return
        self.error = error
        self._end(Status.FAILED)

    def cancel(self) -> bool:
        """End the request because the client is gone; False if it had already ended."""
        if self.done:
            return False
        self._end(Status.CANCELLED)
        return True

    def _end(self, status: Status) -> None:
        self.status = status
        self.ended_at = time.monotonic()
        self._pending.clear()
        if self._pending_bytes:
            self.held_bytes -= self._pending_bytes
            self._ledger.nbytes -= self._pending_bytes
            self._pending_bytes = 0
        self._wake()

    def check_deadlines(self, now: float, first_chunk_timeout_s: float, idle_timeout_s: float, gap_timeout_s: float) -> bool:
        """Fail the request if a timeout passed; True if it did."""
        if self.done:
            return False
        if self._gap_since is not None and now - self._gap_since > gap_timeout_s:
            self.timed_out = "gap"
            self.fail(
                UpstreamError(f"chunk seq {len(self.pieces)} never arrived (waited {gap_timeout_s:g} s)", code="missing_chunk")
            )
        elif self.first_chunk_at is None and not self._pending:
            if now - self.started_at > first_chunk_timeout_s:
                self.timed_out = "first_chunk"
                self.fail(UpstreamTimeout(f"no answer from the model node within {first_chunk_timeout_s:g} s"))
        elif self.last_chunk_at is not None and now - self.last_chunk_at > idle_timeout_s:
            self.timed_out = "idle"
            self.fail(UpstreamTimeout(f"the model node went silent for {idle_timeout_s:g} s"))
        return self.done
