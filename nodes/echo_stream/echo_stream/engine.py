"""``EchoStream``: the node's logic without dora, one chunk per request per delay.

Requests arrive on ``v1/chat/completions`` and are answered on ``chunks``
with the shared wire protocol (``openai_stream_protocol``); ``cancel`` stops
a request. Many requests are served at once: each one in flight is a
``Generation`` in a heap ordered by when its next chunk is due, so their
chunks interleave. Step mode (``step.py``) paces them all on one clock instead.

While it holds requests the loop sends a heartbeat every ``ECHO_HEARTBEAT_S``
(``openai_stream_protocol.Heartbeat``; docs/architecture.md, "Hello and
heartbeat"), from this thread, the one that owns ``send_output``.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from openai_stream_protocol import ChunkSender, Heartbeat, OutputSender, ResendAsk, ResendingOutput, dispatch_event

from .plan import Plan, plan
from .settings import Settings
from .tools import Delta

logger = logging.getLogger(__name__)

CHUNKS_OUTPUT = "chunks"
Event = Mapping[str, Any]

# A round emits at most this many chunks before looking for new events, so
# that at 0 delay a cancel or a new request waits for ~256 sends, not for
# every active request.
MAX_CHUNKS_PER_ROUND = 256
# Chunks due within this margin are sent now: a dora ``next(timeout=...)``
# that times out costs ~0.1 ms (it builds an error event), more than the wait.
EARLY_S = 0.001
EXIT_STATUS = 70
"""The status ``ECHO_EXIT_ON`` exits with: not 0, so that a restart policy of ``on-failure`` brings the node back."""


class ExitReached(Exception):
    """An echo reached ``ECHO_EXIT_ON`` (tests): the node exits before sending that token."""


def crash() -> None:
    """Exit at once, as a crashed model would: no cleanup, no goodbye to dora (``os._exit``)."""
    os._exit(EXIT_STATUS)


@runtime_checkable
class EventSource(Protocol):
    """The part of ``dora.Node`` the loop reads from."""

    def next(self, timeout: float | None = None) -> Event | None: ...

    def drain(self) -> list[Event]: ...


class ListSource:
    """A plain iterable as an ``EventSource``: every event is already received, then the stream ends."""

    def __init__(self, events: Iterable[Event]) -> None:
        self._events: Iterator[Event] = iter(events)

    def next(self, timeout: float | None = None) -> Event | None:
        return next(self._events, None)

    def drain(self) -> list[Event]:
        return list(self._events)


@dataclass(slots=True)
class Generation:
    """One request being answered: its ``Plan``, where it has got to, and the sender of its chunks."""

    sender: ChunkSender
    plan: Plan
    pos: int = 0

    def send_next(self, stamp: bool = False) -> bool:
        """Send the next chunk (``stamp``: with ``sent_at``); False once that was the last one."""
        plan = self.plan
        extra = {"sent_at": time.time()} if stamp else {}
        if plan.deltas is not None:
            return self._send_next_delta(plan.deltas, extra)
        end = min(self.pos + plan.tokens_per_chunk, plan.limit)
        if self.pos < plan.reasoning:  # reasoning mode: a chunk is reasoning or answer, never both
            end = min(end, plan.reasoning)
        if plan.exit_at is not None and end > plan.exit_at:
            raise ExitReached(self.sender.request_id)
        text = "".join(plan.tokens[self.pos : end])
        reasoning = self.pos < plan.reasoning
        self.pos = end
        if reasoning:
            self.sender.send_reasoning(text, **extra)
            if end < plan.limit:
                return True
            text = ""  # an answer of reasoning only: the finish chunk follows, empty
        elif end < plan.limit:
            self.sender.send(text, **extra)
            return True
        self.sender.finish(
            plan.finish_reason,
            text,
            prompt_tokens=plan.prompt_tokens,
            completion_tokens=plan.limit,
            stop_sequence=plan.stop_sequence,
            reasoning_tokens=plan.reasoning if plan.reasoning else None,
            **extra,
        )
        return False

    def _send_next_delta(self, deltas: list[Delta], extra: dict[str, float]) -> bool:
        """Tool mode: the next tool-call chunk, then (one chunk later) the ``tool_calls`` finish."""
        if self.pos < len(deltas):
            delta = deltas[self.pos]
            self.pos += 1
            self.sender.send_tool_call(delta.index, delta.arguments, call_id=delta.call_id, name=delta.name, **extra)
            return True
        plan = self.plan
        self.sender.finish(plan.finish_reason, prompt_tokens=plan.prompt_tokens, completion_tokens=plan.limit, **extra)
        return False


class EchoStream:
    """The node's logic without dora: ``handle`` events, ``step`` to send what is due, or ``run``.

    ``on_request``, ``on_cancel`` and ``on_stop`` are what ``dispatch_event`` calls;
    ``open_sender``, ``schedule``, ``on_cancel`` and ``step`` are what step mode replaces.
    """

    def __init__(
        self,
        node: OutputSender,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        output: str = CHUNKS_OUTPUT,
        heartbeat: Heartbeat | None = None,
        on_exit: Callable[[], None] = crash,
    ) -> None:
        self.node = node
        self.settings = settings or Settings()
        self.clock = clock
        self.output = output
        self.heartbeat = heartbeat
        """Sends the heartbeats while requests are held (``None``: none)."""
        self.on_exit = on_exit
        """What ``ECHO_EXIT_ON`` does once an echo reaches it: ``crash`` (tests pass a recorder)."""
        self.active: dict[str, Generation] = {}
        # (due time, tie-breaker, generation); entries of cancelled or replaced
        # generations stay until popped and are skipped then.
        self._heap: list[tuple[float, int, Generation]] = []
        self._order = itertools.count()
        self.waiting: dict[str, Generation] = {}
        """Requests past ``max_concurrent``, in arrival order, until a generating one ends."""
        self.stopped = False

    def handle(self, event: Event | None) -> bool:
        """Apply one event; False once the node should exit (``STOP``, or the stream ended with nothing active)."""
        if event is None:
            self.stopped = True
            return bool(self.active)
        return dispatch_event(event, self)

    def on_stop(self) -> None:
        logger.info("stop: dropping %d active requests", len(self.active) + len(self.waiting))
        self.active.clear()
        self.waiting.clear()
        self.stopped = True

    def on_request(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        try:
            sender = self.open_sender(metadata)
        except ValueError:
            logger.warning("dropping a request without request_id or session_id")
            return
        if self.settings.busy:
            sender.busy("echo-stream is busy (ECHO_BUSY)")
            return
        answer = plan(texts, metadata, self.settings.tokens_per_chunk, self.settings.exit_on)
        if answer.error is not None:
            logger.warning("request %s: %s", sender.request_id, answer.error)
            sender.finish("error", error=answer.error)
            return
        request_id = sender.request_id
        if request_id in self.active:
            logger.warning("request %s arrived again: restarting it", request_id)
        generation = Generation(sender, answer)
        limit_concurrent = self.settings.max_concurrent
        if limit_concurrent and request_id not in self.active and len(self.active) >= limit_concurrent:
            self.waiting[request_id] = generation
        else:
            self._begin(generation)
        logger.debug("request %s: %d tokens, finish %s", request_id, answer.limit, answer.finish_reason)

    def open_sender(self, metadata: Mapping[str, Any]) -> ChunkSender:
        """The sender of one request's chunks (step mode queues them for its next batch instead)."""
        return ChunkSender(self.node, metadata, output=self.output)

    def schedule(self, generation: Generation) -> None:
        """Make a newly active generation's first chunk due: after the delay of its first chunk's tokens."""
        answer = generation.plan
        due = self.clock() + self.settings.token_delay_s * min(answer.tokens_per_chunk, max(answer.limit, 1))
        heapq.heappush(self._heap, (due, next(self._order), generation))

    def _begin(self, generation: Generation) -> None:
        self.active[generation.sender.request_id] = generation
        self.schedule(generation)

    def admit(self) -> bool:
        """Start waiting requests while there is room under ``max_concurrent``; True if any started."""
        started = False
        while self.waiting and len(self.active) < self.settings.max_concurrent:
            request_id = next(iter(self.waiting))
            self._begin(self.waiting.pop(request_id))
            started = True
        return started

    def on_cancel(self, request_id: str) -> None:
        # The server has already ended the request: no finish marker either.
        if self.active.pop(request_id, None) is not None or self.waiting.pop(request_id, None) is not None:
            logger.debug("request %s cancelled", request_id)
        if isinstance(self.node, ResendingOutput):
            self.node.forget(request_id)  # nothing of it will be asked for again

    def on_server_gone(self, server: str) -> None:
        """A server process died or dora restarted it: nobody reads what is generated for it any more, so stop that.

        Several server processes share this node (docs/architecture.md, "Several server processes"); each
        request says which one asked (``ChunkSender.server``). A node id that asked nothing changes nothing.
        """
        gone = [rid for rid, g in (*self.active.items(), *self.waiting.items()) if g.sender.server == server]
        for request_id in gone:
            self.on_cancel(request_id)
        if gone:
            logger.info("server %s is gone: stopped %d request(s): %s", server, len(gone), " ".join(gone))

    def on_resend(self, ask: ResendAsk) -> None:
        """The server lacks chunks of a request, lost on the way: send them again (docs/architecture.md, "Resend")."""
        if isinstance(self.node, ResendingOutput):
            held = ask.request_id in self.active or ask.request_id in self.waiting
            sent = self.node.resend(ask, self.output, active=held)
            logger.debug("request %s: resent %d chunk(s) from seq %d on the server's ask", ask.request_id, sent, ask.first)

    def step(self, now: float) -> float | None:
        """Send one chunk of every generation due by ``now`` (up to a round's cap); return when the next is due."""
        due_now: list[tuple[float, Generation]] = []
        heap = self._heap
        active = self.active
        while heap and heap[0][0] <= now + EARLY_S and len(due_now) < MAX_CHUNKS_PER_ROUND:
            due, _, generation = heapq.heappop(heap)
            if active.get(generation.sender.request_id) is generation:
                due_now.append((due, generation))
        stamp, delay_s = self.settings.stamp, self.settings.token_delay_s
        for due, generation in due_now:
            if generation.send_next(stamp):
                heapq.heappush(heap, (max(due + delay_s * generation.plan.tokens_per_chunk, now), next(self._order), generation))
            else:
                del active[generation.sender.request_id]
        while heap and active.get(heap[0][2].sender.request_id) is not heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def run(self, source: EventSource | Iterable[Event]) -> None:
        """Serve until ``STOP``; when the source ends without one, finish what is active first.

        Blocks on ``source.next`` only while nothing is due, so sending never
        waits for events; everything already received is taken with
        ``drain()``: one wake-up per batch (docs/architecture.md, "Facts measured").
        """
        if not isinstance(source, EventSource):
            source = ListSource(source)
        while True:
            try:
                next_due = self.step(self.clock())
            except ExitReached as exc:
                logger.warning("request %s reached ECHO_EXIT_ON: exiting", exc)
                self.on_exit()
                return
            if self.waiting and self.admit():
                continue  # the admitted requests' first chunks may be due before next_due
            beat_in = self.heartbeat.beat(len(self.active), len(self.waiting)) if self.heartbeat is not None else None
            if self.stopped:
                if next_due is None:
                    return
                time.sleep(max(0.0, next_due - self.clock()))
                continue
            timeout = None if next_due is None else next_due - self.clock()
            if beat_in is not None and (timeout is None or beat_in < timeout):
                timeout = beat_in
            if timeout is not None and timeout <= EARLY_S:
                events: list[Event | None] = _drain(source)
            else:
                first = source.next() if timeout is None else source.next(timeout=timeout)
                events = [first] if first is None or first["type"] == "STOP" else [first, *_drain(source)]
            for event in events:
                if not self.handle(event):
                    return


def _drain(source: EventSource) -> list[Event | None]:
    """Everything already queued; dora raises once the channel closed after STOP, which means nothing is."""
    try:
        return list(source.drain())
    except RuntimeError:
        return []
