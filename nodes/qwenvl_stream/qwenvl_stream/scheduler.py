"""The node's event loop: batched generation, a bounded queue, cancel, one message per step.

Threads (docs/architecture.md, "Room 3: dora bridge": never call into one ``Node``
from two threads other than a blocking reader):

- a reader thread iterates the events (``node.next()`` releases the GIL)
  and puts each one on the inbox;
- a few fetch threads (``prefetch.py``) load the images of queued
  requests and put them on the same inbox, so a slow image server never
  holds a batch row: a request joins a batch only once its images are in;
- one engine thread runs the micro-batched ``generate()`` calls (one at a
  time: Qwen2.5-VL keeps per-call state on the model), and the
  continuous-batching manager runs its own loop (``engine.py``); both put
  each decode step's rows on the inbox as one ``("step", rows)`` message;
- the thread that calls ``run`` owns the node's ``send_output``: it takes
  inbox messages one at a time, so requests, cancels and steps are handled
  in arrival order, and it sends each step's rows as ONE batch message
  (``BatchSender``; docs/architecture.md, "Dora wire protocol", batch form).

At most ``max_batch`` requests generate at once, in either scheme; the
others wait in the queue, and one past ``max_queued_requests`` is turned away
as busy (``error_code: busy``: the server may send it to another replica).
``STOP`` drops everything (the server is going away); when the events simply
end (a test's list, or every input closed), what is queued is still finished.

While it holds requests, the owner thread sends a heartbeat every
``QWENVL_HEARTBEAT_S`` (docs/architecture.md, "Hello and heartbeat"). A
request with ``continue_from`` continues an answer another replica started
(``engine.py``); its chunks are numbered on from there (``BatchSender``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from openai_stream_protocol import (
    BatchSender,
    Continuation,
    Heartbeat,
    OutputSender,
    ResendAsk,
    ResendingOutput,
    dispatch_event,
    read_continuation,
)

from .generation import (
    BatchEngine,
    Engine,
    GenerationParams,
    RequestError,
    SerialEngine,
    StepRow,
    sampling_kwargs,
)
from .images import ImageError, ImageLoader, check_image_count
from .parsing import OutputParser, Reasoning
from .prefetch import ImagePrefetcher, LoadImages, image_sources
from .settings import Settings
from .thinking import ThinkParser
from .toolcalls import ToolCallParser

logger = logging.getLogger(__name__)

CHUNKS_OUTPUT = "chunks"
# After STOP, how long to wait for the generation in flight to notice its halt flag.
STOP_GRACE_S = 10.0
# Inbox messages handled at most between two schedules.
DRAIN_MAX = 256

Event = Mapping[str, Any]


@dataclass(eq=False, slots=True)
class Job:
    request_id: str
    texts: list[str]
    params: GenerationParams
    image_sources: list[str] = field(default_factory=list)
    images: list[Any] | None = None
    """Loaded by the prefetch, in ``image_sources`` order; ``None`` while they are being fetched."""
    received_at: float = field(default_factory=time.monotonic)
    halt: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    continuous: bool = False
    """Generating in the continuous batch (else in a ``generate()`` batch)."""
    chunks: int = 0
    tokens: int = 0
    first_piece_at: float | None = None
    parser: OutputParser | None = None
    """With a thinking template or tools: reads the model's ``<think>`` and ``<tool_call>`` tags out of the text
    (``None``: text goes out untouched)."""
    tool_calls: int = 0
    """Tool calls sent so far (the next one's index)."""
    continuation: Continuation | None = None
    """What the client already has of this answer (another replica started it)."""

    @property
    def row_images(self) -> Sequence[Any]:
        return self.images or []


def batch_key(params: GenerationParams) -> tuple[Any, ...]:
    """Requests share a ``generate()`` batch only with the same sampling; a seeded one runs alone (repeatable)."""
    if params.seed is not None:
        return ("seed", object())
    return tuple(sorted(sampling_kwargs(params).items()))


class Scheduler:
    def __init__(
        self,
        node: OutputSender,
        engine: BatchEngine | Engine,
        settings: Settings,
        *,
        output: str = CHUNKS_OUTPUT,
        load_images: LoadImages | None = None,
        heartbeat: Heartbeat | None = None,
    ) -> None:
        self.node = node
        self.heartbeat = heartbeat
        """Sends the heartbeats while requests are held, from the owner thread (``None``: none)."""
        self.engine: BatchEngine = engine if hasattr(engine, "generate_batch") else SerialEngine(engine)  # type: ignore[arg-type]
        self.settings = settings
        self.max_batch = max(1, min(settings.max_batch, self.engine.max_batch))
        self.sender = BatchSender(node, output)
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.work: queue.Queue[list[Job] | None] = queue.Queue()
        self.prefetcher = ImagePrefetcher(
            load_images or ImageLoader.from_settings(settings),
            lambda job, images, error: self.inbox.put(("images", job, images, error)),
        )
        self.pending: deque[Job] = deque()
        self.running: dict[str, Job] = {}
        self.batch_busy = False
        """A ``generate()`` batch is with the engine thread."""
        self.closed = False
        self.stopping = False
        self.completed = 0
        self.last_step_at = time.monotonic()

    def run(self, events: Iterable[Event]) -> None:
        """Serve until ``STOP``, or until the events end and every queued request is answered."""
        threading.Thread(target=self._read, args=(events,), name="qwenvl-reader", daemon=True).start()
        engine_thread = threading.Thread(target=self._engine_loop, name="qwenvl-engine", daemon=True)
        engine_thread.start()
        try:
            self._serve()
        finally:
            self.work.put(None)
            engine_thread.join(STOP_GRACE_S)

    def _serve(self) -> None:
        stop_deadline: float | None = None
        while True:
            if not self.stopping:
                self._schedule()
            beat_in = self._beat()
            idle = not self.running and not self.batch_busy
            if idle and (self.stopping or (self.closed and not self.pending)):
                return
            if self.stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
            deadline = stop_deadline
            if deadline is None and self.running:
                deadline = self.last_step_at + self.settings.streamer_timeout_s
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            if beat_in is not None and (timeout is None or beat_in < timeout):
                timeout = beat_in
            try:
                message = self.inbox.get(timeout=timeout)
            except queue.Empty:
                if deadline is None or time.monotonic() < deadline:
                    continue  # only a heartbeat was due
                if self.stopping:
                    logger.warning("the generation in flight did not stop within %.0f s; exiting anyway", STOP_GRACE_S)
                    return
                self._stalled()
                continue
            self._dispatch(message)
            # What has already arrived is handled before the next schedule, so that requests that came
            # together start together (one generate() batch rather than the first alone).
            for _ in range(DRAIN_MAX):
                try:
                    self._dispatch(self.inbox.get_nowait())
                except queue.Empty:
                    break

    def _beat(self) -> float | None:
        """Send a heartbeat if one is due; the seconds until the next (``None``: idle or no heartbeats)."""
        if self.heartbeat is None:
            return None
        try:
            return self.heartbeat.beat(len(self.running), len(self.pending))
        except Exception as exc:
            logger.warning("could not send a heartbeat (%s)", exc)
            return self.heartbeat.interval_s

    def _read(self, events: Iterable[Event]) -> None:
        try:
            for event in events:
                self.inbox.put(("event", event))
                if event.get("type") == "STOP":
                    break
        except Exception:
            logger.exception("reading dora events failed")
        finally:
            self.inbox.put(("closed",))

    def _engine_loop(self) -> None:
        """Engine thread: starts the engine, then runs one ``generate()`` batch at a time."""

        def on_step(rows: list[StepRow]) -> None:
            self.inbox.put(("step", rows))

        try:
            self.engine.start(on_step)
        except Exception:
            logger.exception("starting the engine failed")
        try:
            while (batch := self.work.get()) is not None:
                error: str | None = None
                try:
                    self.engine.generate_batch(batch, on_step)
                except RequestError as exc:
                    error = str(exc)
                except Exception as exc:
                    logger.exception("a batch of %d request(s) failed", len(batch))
                    error = f"generation failed: {exc}"
                self.inbox.put(("batch-done", batch, error))
        finally:
            try:
                self.engine.close()
            except Exception:
                logger.exception("closing the engine failed")

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":
            dispatch_event(message[1], self)
        elif kind == "step":
            self._on_step(message[1])
        elif kind == "batch-done":
            self._on_batch_done(message[1], message[2])
        elif kind == "images":
            self._on_images(message[1], message[2], message[3])
        elif kind == "closed":
            self.closed = True

    # What dispatch_event calls (openai_stream_protocol.NodeEventHandler).
    def on_request(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        self._submit(texts, metadata)

    def on_cancel(self, request_id: str) -> None:
        self._cancel(request_id)

    def on_resend(self, ask: ResendAsk) -> None:
        """The server lacks rows of a request, lost on the way: send them again from the node's resend memory
        (``ResendingOutput``, given when the dataflow has a ``resend`` input; docs/architecture.md, "Resend")."""
        if isinstance(self.node, ResendingOutput):
            held = ask.request_id in self.running or any(job.request_id == ask.request_id for job in self.pending)
            self.node.resend(ask, self.sender.output, active=held)

    def on_stop(self) -> None:
        logger.info("stop: dropping %d queued request(s) and %d generating", len(self.pending), len(self.running))
        self.stopping = True
        for job in self.pending:
            job.cancelled = True
            job.halt.set()
            self.sender.discard(job.request_id)
        self.pending.clear()
        for request_id in list(self.running):
            self._cancel(request_id)

    def _submit(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        try:
            request_id = self.sender.open(metadata)
        except ValueError:
            logger.warning("dropping a request without request_id or session_id")
            return
        try:
            params = GenerationParams.from_metadata(
                metadata,
                default_max_tokens=self.settings.default_max_tokens,
                max_tokens_limit=self.settings.max_tokens_limit,
            )
        except RequestError as exc:
            self._fail(request_id, str(exc))
            return
        try:
            continuation = read_continuation(metadata)
        except ValueError as exc:  # never answer from the start: the client already has part of it
            self._fail(request_id, f"cannot continue the answer: {exc}")
            return
        if self.stopping:
            self.sender.discard(request_id)
            return
        sources = image_sources(texts)
        try:
            check_image_count(len(sources), self.settings.max_images_per_request)
        except ImageError as exc:
            self._fail(request_id, str(exc))
            return
        # Requests whose images are still being fetched count as waiting; those the next schedule
        # will start (free rows; requests that arrive together are scheduled together) do not.
        ready = sum(1 for job in self.pending if job.images is not None)
        waiting = len(self.pending) - min(ready, max(0, self.max_batch - len(self.running)))
        if waiting >= self.settings.max_queued_requests:
            self._fail(
                request_id,
                f"the model is busy: {waiting} requests are already waiting "
                f"(QWENVL_MAX_QUEUED_REQUESTS={self.settings.max_queued_requests}); retry later",
                busy=True,
            )
            return
        job = Job(request_id, texts, params, image_sources=sources, images=None if sources else [], continuation=continuation)
        if continuation is not None:
            job.tool_calls = len(continuation.calls())  # the next call's index goes on from the delivered ones
        tool_parser = None
        if params.tools:
            remaining = None if params.parallel_tool_calls else max(0, 1 - job.tool_calls)
            tool_parser = ToolCallParser(max_calls=remaining)
        think_parser = self._think_parser(params, continuation)
        if think_parser is not None or tool_parser is not None:
            job.parser = OutputParser(think_parser, tool_parser)
        self.pending.append(job)
        if sources:
            self.prefetcher.submit(job)
        logger.debug("request %s queued (%d waiting)", request_id, len(self.pending))

    def _think_parser(self, params: GenerationParams, continuation: Continuation | None) -> ThinkParser | None:
        """The reader of the answer's ``<think>`` part, for a template that thinks (docs/architecture.md, "Reasoning")."""
        thinking = getattr(self.engine, "thinking", None)
        opened = thinking(params.enable_thinking) if thinking is not None else None
        if opened is None:
            return None
        if continuation is not None and continuation.pieces:
            if any(p.tool_call is None and not p.reasoning and p.text for p in continuation.pieces):
                return None  # the answer has begun: its reasoning is over
            return ThinkParser(inside=any(p.reasoning for p in continuation.pieces) or opened)
        return ThinkParser(inside=opened)

    def _cancel(self, request_id: str | None) -> None:
        # The server has already ended the request: nothing more is sent for it.
        if request_id is None:
            return
        self.sender.discard(request_id)
        if isinstance(self.node, ResendingOutput):
            self.node.forget(request_id)  # nothing of it will be asked for again
        job = self.running.pop(request_id, None)
        if job is not None:
            job.cancelled = True
            job.halt.set()  # a generate() row is masked at the next step
            if job.continuous:
                self.engine.cancel_continuous(request_id)  # its row is freed at the next step
            logger.info("request %s: cancelled after %d of %d tokens", request_id, job.tokens, job.params.max_tokens)
            return
        for job in self.pending:
            if job.request_id == request_id:
                job.cancelled = True
                job.halt.set()  # a fetch of its images stops or never starts
                self.pending.remove(job)
                logger.info("request %s cancelled while queued", request_id)
                return

    def _schedule(self) -> None:
        """Fill free rows: text requests join the continuous batch, the rest wait for the next ``generate()`` batch.

        A job still fetching its images keeps its place in the queue.
        """
        batch: list[Job] = []
        key: tuple[Any, ...] | None = None
        for job in list(self.pending):
            if len(self.running) + len(batch) >= self.max_batch:
                break
            if job.cancelled:
                self.pending.remove(job)
                continue
            if job.images is None:
                continue
            if self.engine.accepts_continuous(job.params, bool(job.image_sources)):
                self.pending.remove(job)
                try:
                    joined = self.engine.start_continuous(job)
                except RequestError as exc:
                    self._end_failed(job, str(exc))
                    continue
                except Exception as exc:
                    logger.exception("request %s: could not join the continuous batch", job.request_id)
                    self._end_failed(job, f"generation failed: {exc}")
                    continue
                if joined:
                    job.continuous = True
                    self.running[job.request_id] = job
                    self.last_step_at = time.monotonic()
                    continue
                # No manager after all (it failed to start): from now on the engine declines, and the job waits for generate().
                self.pending.appendleft(job)
                self._schedule()
                return
            if self.batch_busy:
                continue
            job_key = batch_key(job.params)
            if key is None:
                key = job_key
            if job_key == key:
                self.pending.remove(job)
                batch.append(job)
        if batch:
            for job in batch:
                self.running[job.request_id] = job
            self.batch_busy = True
            self.last_step_at = time.monotonic()
            self.work.put(batch)

    def _on_step(self, rows: list[StepRow]) -> None:
        """One decode step's rows, sent as one message: one row per request (its last text rides on its finish row)."""
        self.last_step_at = time.monotonic()
        for row in rows:
            job = self.running.get(row.request_id)
            if job is None or job.cancelled:
                continue
            job.tokens = max(job.tokens, row.tokens)
            if row.text:
                if job.first_piece_at is None:
                    job.first_piece_at = time.monotonic()
                job.chunks += 1
            text = row.text
            if job.parser is not None:
                self._send_parsed(job, job.parser, row)
                if not row.ended:
                    continue
                text = ""
            if not row.ended:
                self.sender.send(job.request_id, text)
                continue
            del self.running[job.request_id]
            self.completed += 1
            if row.outcome is None:
                self.sender.finish(job.request_id, "error", text, error=row.error)
                self._log_completion(job, "error", 0)
                continue
            finish_reason = row.outcome.finish_reason
            if job.tool_calls and finish_reason == "stop":
                finish_reason = "tool_calls"
            self.sender.finish(
                job.request_id,
                finish_reason,
                text,
                prompt_tokens=row.outcome.prompt_tokens,
                completion_tokens=row.outcome.completion_tokens,
                stop_sequence=row.outcome.stop_sequence if finish_reason == "stop" else None,
            )
            self._log_completion(job, finish_reason, row.outcome.completion_tokens)
        self._emit()

    def _send_parsed(self, job: Job, parser: OutputParser, row: StepRow) -> None:
        """A row's text through the request's parsers: reasoning rows, content rows and one tool-call row per whole call."""
        pieces = parser.feed(row.text) if row.text else []
        if row.ended:
            pieces += parser.flush()
        for piece in pieces:
            if isinstance(piece, Reasoning):
                self.sender.send_reasoning(job.request_id, piece.text)
            elif isinstance(piece, str):
                self.sender.send(job.request_id, piece)
            else:
                self.sender.send_tool_call(job.request_id, job.tool_calls, piece.arguments, call_id=piece.id, name=piece.name)
                job.tool_calls += 1

    def _on_batch_done(self, batch: list[Job], error: str | None) -> None:
        """A ``generate()`` batch returned: rows it left open (it raised) end with the error."""
        self.batch_busy = False
        for job in batch:
            if self.running.get(job.request_id) is job:
                del self.running[job.request_id]
                self._end_failed(job, error or "generation ended without finishing the request")

    def _stalled(self) -> None:
        """No step for ``streamer_timeout_s`` while requests generate: they fail, and their rows are halted."""
        message = f"no output from the model for {self.settings.streamer_timeout_s:g} s (QWENVL_STREAMER_TIMEOUT_S)"
        logger.warning("%s; failing %d request(s)", message, len(self.running))
        for request_id, job in list(self.running.items()):
            del self.running[request_id]
            job.halt.set()
            if job.continuous:
                self.engine.cancel_continuous(request_id)
            self._end_failed(job, message)
        self.last_step_at = time.monotonic()

    def _on_images(self, job: Job, images: list[Any] | None, error: str | None) -> None:
        self.prefetcher.release()
        if job.cancelled or job not in self.pending:
            return
        if images is None:
            self.pending.remove(job)
            self._end_failed(job, error or "image fetch failed")
            return
        job.images = images

    def _end_failed(self, job: Job, message: str) -> None:
        self.completed += 1
        self._fail(job.request_id, message)
        self._log_completion(job, "error", 0)

    def _fail(self, request_id: str, message: str, *, busy: bool = False) -> None:
        """End the request with an error chunk; ``busy``: a turn-away (nothing generated) another replica may serve."""
        try:
            if busy:
                self.sender.busy(request_id, message)
            else:
                self.sender.finish(request_id, "error", error=message)
        except KeyError:  # cancelled meanwhile
            return
        self._emit()
        # %r: the message may quote the client (a media type, a stop string): one log line, whatever it holds.
        logger.info("request %s ended with an error: %r", request_id, message)

    def _emit(self) -> None:
        try:
            self.sender.emit()
        except Exception as exc:
            # The rows are gone with the message; the server times those requests out.
            logger.warning("could not send a chunk message (%s)", exc)

    def _log_completion(self, job: Job, finish_reason: str, completion_tokens: int) -> None:
        now = time.monotonic()
        ttft = "-" if job.first_piece_at is None else f"{job.first_piece_at - job.received_at:.3f}s"
        logger.info(
            "request %s: finish_reason=%s chunks=%d completion_tokens=%d ttft=%s duration=%.3fs",
            job.request_id,
            finish_reason,
            job.chunks,
            completion_tokens,
            ttft,
            now - job.received_at,
        )
