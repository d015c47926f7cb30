"""The node's event loop: one generation at a time, a bounded queue, cancel, chunks out.

Threads (docs/architecture.md, "Dora bridge": never call into one ``Node``
from two threads other than a blocking reader):

- a reader thread iterates the events (``node.next()`` releases the GIL)
  and puts each one on the inbox;
- a few fetch threads (``prefetch.py``) load the images of queued
  requests and put them on the same inbox, so a slow image server never
  holds the generation slot: a request starts only once its images are in;
- a worker thread per request runs the engine and puts its decoded
  pieces and its outcome on the same inbox;
- the thread that calls ``run`` owns the node's ``send_output``: it takes
  inbox messages one at a time, so requests, cancels and pieces are
  handled in arrival order, with no polling delay.

``STOP`` drops everything (the server is going away); when the events
simply end (a test's list, or every input closed), what is queued is
still finished.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from openai_stream_protocol import ChunkSender, OutputSender, dispatch_event

from .generation import Engine, GenerationParams, Outcome, RequestError, StopFilter
from .images import ImageLoader
from .prefetch import ImagePrefetcher, image_sources
from .settings import Settings

logger = logging.getLogger(__name__)

CHUNKS_OUTPUT = "chunks"
# After STOP, how long to wait for the generation in flight to notice its halt flag.
STOP_GRACE_S = 10.0

Event = Mapping[str, Any]


@dataclass(eq=False, slots=True)
class Job:
    sender: ChunkSender
    texts: list[str]
    params: GenerationParams
    image_sources: list[str] = field(default_factory=list)
    images: list[Any] | None = None
    """Loaded by the prefetch, in ``image_sources`` order; ``None`` while they are being fetched."""
    received_at: float = field(default_factory=time.monotonic)
    halt: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False
    chunks: int = 0
    first_piece_at: float | None = None

    @property
    def request_id(self) -> str:
        return self.sender.request_id


class Scheduler:
    def __init__(
        self,
        node: OutputSender,
        engine: Engine,
        settings: Settings,
        *,
        output: str = CHUNKS_OUTPUT,
        load_image: Callable[[str], Any] | None = None,
    ) -> None:
        self.node = node
        self.engine = engine
        self.settings = settings
        self.output = output
        self.inbox: queue.Queue[tuple[Any, ...]] = queue.Queue()
        self.prefetcher = ImagePrefetcher(
            load_image or ImageLoader.from_settings(settings),
            lambda job, images, error: self.inbox.put(("images", job, images, error)),
        )
        self.pending: deque[Job] = deque()
        self.active: Job | None = None
        self.closed = False
        self.stopping = False
        self.completed = 0

    def run(self, events: Iterable[Event]) -> None:
        """Serve until ``STOP``, or until the events end and every queued request is answered."""
        threading.Thread(target=self._read, args=(events,), name="qwenvl-reader", daemon=True).start()
        stop_deadline: float | None = None
        while True:
            if self.active is None and not self.stopping:
                self._start_next()
            if self.active is None and (self.stopping or (self.closed and not self.pending)):
                return
            if self.stopping and stop_deadline is None:
                stop_deadline = time.monotonic() + STOP_GRACE_S
            try:
                timeout = None if stop_deadline is None else max(0.0, stop_deadline - time.monotonic())
                message = self.inbox.get(timeout=timeout)
            except queue.Empty:
                logger.warning("the generation in flight did not stop within %.0f s; exiting anyway", STOP_GRACE_S)
                return
            self._dispatch(message)

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

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "event":
            self._on_event(message[1])
        elif kind == "piece":
            self._on_piece(message[1], message[2])
        elif kind == "done":
            self._on_done(message[1], message[2], message[3])
        elif kind == "images":
            self._on_images(message[1], message[2], message[3])
        elif kind == "closed":
            self.closed = True

    def _on_event(self, event: Event) -> None:
        dispatch_event(event, self)

    # What dispatch_event calls (openai_stream_protocol.NodeEventHandler).
    def on_request(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        self._submit(texts, metadata)

    def on_cancel(self, request_id: str) -> None:
        self._cancel(request_id)

    def on_stop(self) -> None:
        logger.info("stop: dropping %d queued request(s) and the one in flight", len(self.pending))
        self.stopping = True
        for job in self.pending:
            job.cancelled = True
        self.pending.clear()
        if self.active is not None:
            self.active.cancelled = True
            self.active.halt.set()

    def _submit(self, texts: list[str], metadata: Mapping[str, Any]) -> None:
        try:
            sender = ChunkSender(self.node, metadata, output=self.output)
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
            self._fail(sender, str(exc))
            return
        if self.stopping:
            return
        # Requests whose images are still being fetched count as waiting, whether or not one generates.
        if len(self.pending) >= self.settings.max_queued_requests:
            self._fail(
                sender,
                f"the model is busy: {len(self.pending)} requests are already waiting "
                f"(QWENVL_MAX_QUEUED_REQUESTS={self.settings.max_queued_requests}); retry later",
            )
            return
        sources = image_sources(texts)
        job = Job(sender, texts, params, image_sources=sources, images=None if sources else [])
        self.pending.append(job)
        if sources:
            self.prefetcher.submit(job)
        logger.debug("request %s queued (%d waiting)", sender.request_id, len(self.pending))

    def _cancel(self, request_id: str | None) -> None:
        # The server has already ended the request: nothing more is sent for it.
        if request_id is None:
            return
        if self.active is not None and self.active.request_id == request_id:
            self.active.cancelled = True
            self.active.halt.set()
            logger.debug("request %s cancelled after %d chunk(s)", request_id, self.active.chunks)
            return
        for job in self.pending:
            if job.request_id == request_id:
                job.cancelled = True
                job.halt.set()  # a fetch of its images stops or never starts
                self.pending.remove(job)
                logger.info("request %s cancelled while queued", request_id)
                return

    def _start_next(self) -> None:
        """The oldest job whose images are loaded takes the slot; one still fetching keeps its place."""
        for job in list(self.pending):
            if job.cancelled:
                self.pending.remove(job)
                continue
            if job.images is None:
                continue
            self.pending.remove(job)
            self.active = job
            threading.Thread(target=self._work, args=(job,), name=f"qwenvl-job-{job.request_id}", daemon=True).start()
            return

    def _work(self, job: Job) -> None:
        """Worker thread: run the engine, forward pieces through the stop-string filter."""
        stops = StopFilter(job.params.stop)

        def emit(piece: str) -> None:
            text = stops.feed(piece)
            if text:
                self.inbox.put(("piece", job, text))
            if stops.hit:
                job.halt.set()

        outcome: Outcome | None = None
        error: str | None = None
        try:
            outcome = self.engine.generate(job.texts, job.params, emit, job.halt, images=job.images or [])
            tail = stops.flush()
            if tail:
                self.inbox.put(("piece", job, tail))
            if stops.hit:
                outcome = replace(outcome, finish_reason="stop")
        except RequestError as exc:
            error = str(exc)
        except Exception as exc:
            logger.exception("request %s: generation failed", job.request_id)
            error = f"generation failed: {exc}"
        self.inbox.put(("done", job, outcome, error))

    def _on_images(self, job: Job, images: list[Any] | None, error: str | None) -> None:
        self.prefetcher.release()
        if job.cancelled or job not in self.pending:
            return
        if images is None:
            self.pending.remove(job)
            self.completed += 1
            self._fail(job.sender, error or "image fetch failed", job)
            return
        job.images = images

    def _on_piece(self, job: Job, text: str) -> None:
        if job.cancelled or job.sender.finished:
            return
        if job.first_piece_at is None:
            job.first_piece_at = time.monotonic()
        try:
            job.sender.send(text)
            job.chunks += 1
        except Exception as exc:
            logger.warning("request %s: could not send a chunk (%s); stopping it", job.request_id, exc)
            job.cancelled = True
            job.halt.set()

    def _on_done(self, job: Job, outcome: Outcome | None, error: str | None) -> None:
        if job is self.active:
            self.active = None
        if job.cancelled:
            if outcome is not None:
                logger.info(
                    "request %s: cancelled after %d of %d tokens",
                    job.request_id,
                    outcome.completion_tokens,
                    job.params.max_tokens,
                )
            return
        if job.sender.finished:
            return
        self.completed += 1
        if outcome is None:
            self._fail(job.sender, error or "generation failed", job)
            return
        try:
            job.sender.finish(
                outcome.finish_reason,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
            )
        except Exception as exc:
            logger.warning("request %s: could not send the finish marker (%s)", job.request_id, exc)
            return
        self._log_completion(job, outcome.finish_reason, outcome.completion_tokens)

    def _fail(self, sender: ChunkSender, message: str, job: Job | None = None) -> None:
        try:
            sender.finish("error", error=message)
        except Exception as exc:
            logger.warning("request %s: could not send the error chunk (%s)", sender.request_id, exc)
        if job is not None:
            self._log_completion(job, "error", 0)
        else:
            logger.info("request %s refused: %s", sender.request_id, message)

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
