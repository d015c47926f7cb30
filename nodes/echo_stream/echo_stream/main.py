"""echo-stream: answers each chat request with its last user message, streamed token by token.

A stand-in for a streaming model node. Requests arrive on ``v1/chat/completions``
and are answered on ``chunks`` with the shared wire protocol
(``openai_stream_protocol``); ``cancel`` stops a request. Many requests
are served at once: each one in flight is a ``Generation`` in a heap ordered by
when its next chunk is due, so their chunks interleave. A request with ``tools``
can be answered with tool calls (``tools.py``).
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, runtime_checkable

from openai_stream_protocol import (
    TOOLS_KEY,
    ChunkSender,
    OutputSender,
    Part,
    as_bool,
    as_int,
    dispatch_event,
    last_user_text,
    parse_request_texts,
    send_hello,
    split_tokens,
)

from .tools import Delta, call_deltas, requested_calls

logger = logging.getLogger(__name__)

CHUNKS_OUTPUT = "chunks"
Event = Mapping[str, Any]
_N = TypeVar("_N", int, float)

# A round emits at most this many chunks before looking for new events, so
# that at 0 delay a cancel or a new request waits for ~256 sends, not for
# every active request.
MAX_CHUNKS_PER_ROUND = 256
# Chunks due within this margin are sent now: a dora ``next(timeout=...)``
# that times out costs ~0.1 ms (it builds an error event), more than the wait.
EARLY_S = 0.001


@dataclass(frozen=True, slots=True)
class Settings:
    tokens_per_chunk: int = 1
    token_delay_s: float = 0.02
    stamp: bool = False
    """Add ``sent_at`` (``time.time()``) to every chunk's metadata, for benchmarks."""
    step_ms: float = 0.0
    """``ECHO_STEP_MS``: above 0, step mode (``step.py``): every step, one message with every active request's next chunk."""
    max_concurrent: int = 0
    """``ECHO_MAX_CONCURRENT``: above 0, at most this many requests generate at once; the rest wait in arrival order
    (a model's capacity, so that replicas have something to share; ignored in step mode)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        tokens = _env_number(environ, "ECHO_TOKENS_PER_CHUNK", "1", int)
        delay = _env_number(environ, "ECHO_TOKEN_DELAY_S", "0.02", float)
        if tokens < 1:
            raise ValueError(f"ECHO_TOKENS_PER_CHUNK must be at least 1, got {tokens}")
        if not 0 <= delay <= 60:
            raise ValueError(f"ECHO_TOKEN_DELAY_S must be between 0 and 60 seconds, got {delay}")
        stamp = environ.get("ECHO_STAMP", "0").strip().lower() in ("1", "true", "yes")
        step_ms = _env_number(environ, "ECHO_STEP_MS", "0", float)
        if not 0 <= step_ms <= 60_000:
            raise ValueError(f"ECHO_STEP_MS must be between 0 and 60000 ms, got {step_ms}")
        max_concurrent = _env_number(environ, "ECHO_MAX_CONCURRENT", "0", int)
        if max_concurrent < 0:
            raise ValueError(f"ECHO_MAX_CONCURRENT must be 0 (no limit) or more, got {max_concurrent}")
        return cls(tokens_per_chunk=tokens, token_delay_s=delay, stamp=stamp, step_ms=step_ms, max_concurrent=max_concurrent)


def _env_number(environ: Mapping[str, str], name: str, default: str, cast: Callable[[str], _N]) -> _N:
    raw = environ.get(name, default)
    try:
        return cast(raw.strip())
    except ValueError:
        raise ValueError(f"{name} must be a number, got {raw!r}") from None


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
    sender: ChunkSender
    tokens: list[str]
    limit: int
    finish_reason: str
    prompt_tokens: int
    tokens_per_chunk: int
    pos: int = 0
    deltas: list[Delta] | None = None
    """Tool mode: the tool-call chunks to send instead of ``tokens`` (then a ``tool_calls`` finish)."""
    stop_sequence: str | None = None
    """The stop string that cut ``tokens``: the ``stop`` finish chunk says so (``stop_sequence``)."""


def plan(texts: list[str], metadata: Mapping[str, Any]) -> tuple[list[str], int, str, int, str | None]:
    """The tokens to echo, how many to send, the finish reason, the prompt's token count and the stop
    string that ended the answer (``None`` unless the finish reason is ``stop`` because of one)."""
    parts = parse_request_texts(texts)
    prompt_tokens = sum(len(split_tokens(part.content)) for part in parts if part.kind != "image")
    text, stop_sequence = _cut_at_stop(answer_text(parts), metadata.get("stop"))
    tokens = split_tokens(text)
    try:
        max_tokens = as_int(metadata.get("max_tokens"))
    except ValueError:
        # dora turns a None metadata value into the string "None": read as unset.
        max_tokens = None
    if max_tokens is not None and 0 < max_tokens < len(tokens):
        return tokens, max_tokens, "length", prompt_tokens, None
    return tokens, len(tokens), "stop", prompt_tokens, stop_sequence


def answer_text(parts: list[Part]) -> str:
    """What to echo: the trailing tool results' text when the conversation ends with them, else the last user turn."""
    results: list[str] = []
    for part in reversed(parts):
        if part.role != "tool":
            break
        results.append(part.content)
    return "\n".join(reversed(results)) if results else last_user_text(parts)


def _cut_at_stop(text: str, stop: Any) -> tuple[str, str | None]:
    """OpenAI ``stop``: the answer ends before the first stop sequence, which is not sent.

    Returns the text and the stop sequence that cut it (``None``: none did). The first is the one
    found earliest in the text; of two found at the same place, the shorter, which a model streaming
    the text would have completed first.
    """
    sequences = [stop] if isinstance(stop, str) else stop if isinstance(stop, list) else []
    cuts = [(text.find(s), len(s), s) for s in sequences if isinstance(s, str) and s]
    found = [cut for cut in cuts if cut[0] >= 0]
    if not found:
        return text, None
    at, _, sequence = min(found)
    return text[:at], sequence


class EchoStream:
    """The node's logic without dora: ``handle`` events, ``step`` to send what is due, or ``run``.

    ``on_request``, ``on_cancel`` and ``on_stop`` are what ``dispatch_event`` calls.
    """

    def __init__(
        self,
        node: OutputSender,
        settings: Settings | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        output: str = CHUNKS_OUTPUT,
    ) -> None:
        self.node = node
        self.settings = settings or Settings()
        self.clock = clock
        self.output = output
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
        tokens, limit, finish_reason, prompt_tokens, stop_sequence = plan(texts, metadata)
        if sender.request_id in self.active:
            logger.warning("request %s arrived again: restarting it", sender.request_id)
        # Nobody watches a non-streaming answer arrive: send it whole, as one message, after the
        # same delay (a model node would too; it saves a dora message per token).
        whole = "stream" in metadata and not as_bool(metadata["stream"])
        per_chunk = max(limit, 1) if whole else self.settings.tokens_per_chunk
        generation = Generation(sender, tokens, limit, finish_reason, prompt_tokens, per_chunk, stop_sequence=stop_sequence)
        if TOOLS_KEY in metadata:  # only then: no cost for the others
            calls = requested_calls(parse_request_texts(texts), metadata)
            if calls:
                generation.deltas, generation.limit = call_deltas(calls, self.settings.tokens_per_chunk, whole=whole)
                generation.finish_reason = "tool_calls"
        limit_concurrent = self.settings.max_concurrent
        if limit_concurrent and sender.request_id not in self.active and len(self.active) >= limit_concurrent:
            self.waiting[sender.request_id] = generation
        else:
            self._begin(generation)
        logger.debug("request %s: %d tokens, finish %s", sender.request_id, limit, finish_reason)

    def _begin(self, generation: Generation) -> None:
        self.active[generation.sender.request_id] = generation
        due = self.clock() + self.settings.token_delay_s * min(generation.tokens_per_chunk, max(generation.limit, 1))
        heapq.heappush(self._heap, (due, next(self._order), generation))

    def admit(self) -> bool:
        """Start waiting requests while there is room under ``max_concurrent``; True if any started."""
        started = False
        while self.waiting and len(self.active) < self.settings.max_concurrent:
            request_id = next(iter(self.waiting))
            self._begin(self.waiting.pop(request_id))
            started = True
        return started

    def open_sender(self, metadata: Mapping[str, Any]) -> ChunkSender:
        """The sender of one request's chunks (step mode queues them for its next batch instead)."""
        return ChunkSender(self.node, metadata, output=self.output)

    def on_cancel(self, request_id: str) -> None:
        # The server has already ended the request: no finish marker either.
        if self.active.pop(request_id, None) is not None or self.waiting.pop(request_id, None) is not None:
            logger.debug("request %s cancelled", request_id)

    def step(self, now: float) -> float | None:
        """Send one chunk of every generation due by ``now`` (up to a round's cap); return when the next is due."""
        due_now: list[tuple[float, Generation]] = []
        heap = self._heap
        while heap and heap[0][0] <= now + EARLY_S and len(due_now) < MAX_CHUNKS_PER_ROUND:
            due, _, generation = heapq.heappop(heap)
            if self.active.get(generation.sender.request_id) is generation:
                due_now.append((due, generation))
        for due, generation in due_now:
            if self._send_next(generation):
                delay_s = self.settings.token_delay_s * generation.tokens_per_chunk
                heapq.heappush(heap, (max(due + delay_s, now), next(self._order), generation))
            else:
                del self.active[generation.sender.request_id]
        while heap and self.active.get(heap[0][2].sender.request_id) is not heap[0][2]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def _send_next(self, generation: Generation) -> bool:
        """Send the generation's next chunk; False once that was the last one."""
        if generation.deltas is not None:
            return self._send_next_delta(generation)
        end = min(generation.pos + generation.tokens_per_chunk, generation.limit)
        text = "".join(generation.tokens[generation.pos : end])
        generation.pos = end
        extra = {"sent_at": time.time()} if self.settings.stamp else {}
        if end < generation.limit:
            generation.sender.send(text, **extra)
            return True
        generation.sender.finish(
            generation.finish_reason,
            text,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.limit,
            stop_sequence=generation.stop_sequence,
            **extra,
        )
        return False

    def _send_next_delta(self, generation: Generation) -> bool:
        """Tool mode: the next tool-call chunk, then (one chunk later) the ``tool_calls`` finish; False after the finish."""
        extra = {"sent_at": time.time()} if self.settings.stamp else {}
        deltas = generation.deltas or []
        if generation.pos < len(deltas):
            delta = deltas[generation.pos]
            generation.pos += 1
            generation.sender.send_tool_call(delta.index, delta.arguments, call_id=delta.call_id, name=delta.name, **extra)
            return True
        generation.sender.finish(
            generation.finish_reason,
            prompt_tokens=generation.prompt_tokens,
            completion_tokens=generation.limit,
            **extra,
        )
        return False

    def run(self, source: EventSource | Iterable[Event]) -> None:
        """Serve until ``STOP``; when the source ends without one, finish what is active first.

        Blocks on ``source.next`` only while nothing is due, so sending never
        waits for events; everything already received is taken with
        ``drain()`` (docs/architecture.md: one wake-up per batch).
        """
        if not isinstance(source, EventSource):
            source = ListSource(source)
        while True:
            next_due = self.step(self.clock())
            if self.waiting and self.admit():
                continue  # the admitted requests' first chunks may be due before next_due
            if self.stopped:
                if next_due is None:
                    return
                time.sleep(max(0.0, next_due - self.clock()))
                continue
            timeout = None if next_due is None else next_due - self.clock()
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


def _node_id(environ: Mapping[str, str]) -> str:
    """This node's id from dora's ``DORA_NODE_CONFIG`` (a ``node_id: <id>`` line), else the package name."""
    match = re.search(r"^node_id: *(\S+)", environ.get("DORA_NODE_CONFIG", ""), re.MULTILINE)
    return match.group(1) if match else "echo-stream"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Streaming echo node for dora-rs")
    parser.add_argument("--name", help="node id when run as a dynamic node (default: the id given by the dataflow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ECHO_LOG_LEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(os.environ)

    from dora import Node  # here, so that the logic above imports and tests without dora

    node = Node(args.name) if args.name else Node()
    if settings.step_ms and settings.max_concurrent:
        logger.warning("ECHO_MAX_CONCURRENT is ignored in step mode")
        settings = dataclasses.replace(settings, max_concurrent=0)
    # Say we are up: after `dora node restart` that is how the server knows this replica is back.
    send_hello(node, args.name or _node_id(os.environ), CHUNKS_OUTPUT)
    logger.info(
        "echo-stream: %d token(s) per chunk, %.3f s per token%s%s%s",
        settings.tokens_per_chunk,
        settings.token_delay_s,
        ", stamped" if settings.stamp else "",
        f", step mode: one message every {settings.step_ms:g} ms" if settings.step_ms else "",
        f", at most {settings.max_concurrent} at once" if settings.max_concurrent else "",
    )
    if settings.step_ms:
        from .step import StepEcho  # step.py builds on this module

        StepEcho(node, settings).run(node)
    else:
        EchoStream(node, settings).run(node)


if __name__ == "__main__":
    main()
