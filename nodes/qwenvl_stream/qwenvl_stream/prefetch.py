"""Fetching and decoding a queued request's images before it may take the generation slot.

One request generates at a time; if its images were fetched inside that
slot, one slow image server would stall every request queued behind it.
So the scheduler hands each request that names images to an
``ImagePrefetcher`` as soon as it is queued: at most ``workers`` requests
have a fetch thread at a time (each fetch is bounded by
``QWENVL_IMAGE_TIMEOUT_S`` per image), the others wait their turn, and a
request starts generating only once its images are loaded. Requests
without images never wait here.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from openai_stream_protocol import parse_request_texts

from .chat import to_chat
from .images import FETCH_FAILED, ImageError

logger = logging.getLogger(__name__)

PREFETCH_WORKERS = 4


def image_sources(texts: Iterable[str]) -> list[str]:
    """The request's image references (URLs, data URIs, base64), in prompt order."""
    return to_chat(parse_request_texts(texts)).image_sources


class PrefetchJob(Protocol):
    request_id: str
    image_sources: list[str]
    halt: threading.Event
    """Set on cancel: the fetch stops before its next image, and a waiting one never starts."""


LoadImages = Callable[[Sequence[str], threading.Event], "list[Any]"]
"""``(sources, halt)`` → the request's images, in order (``images.ImageLoader``); raises ``ImageError``."""
Deliver = Callable[[Any, "list[Any] | None", "str | None"], None]
"""``(job, images, error)``, called from a fetch thread: exactly one of ``images`` and ``error`` is set."""


class ImagePrefetcher:
    """Runs fetches in threads of their own, at most ``workers`` at once.

    ``submit`` and ``release`` are called from the scheduler's thread only,
    so the counters need no lock; ``deliver`` hands each result back to that
    thread (through its inbox), which then calls ``release``.
    """

    def __init__(self, load: LoadImages, deliver: Deliver, *, workers: int = PREFETCH_WORKERS) -> None:
        self.load = load
        self.deliver = deliver
        self.workers = workers
        self.running = 0
        self.waiting: deque[PrefetchJob] = deque()

    def submit(self, job: PrefetchJob) -> None:
        self.waiting.append(job)
        self._start()

    def release(self) -> None:
        """One fetch's result has been handled: its slot goes to the next waiting job."""
        self.running = max(0, self.running - 1)
        self._start()

    def _start(self) -> None:
        while self.running < self.workers and self.waiting:
            job = self.waiting.popleft()
            if job.halt.is_set():
                continue
            self.running += 1
            threading.Thread(target=self._fetch, args=(job,), name=f"qwenvl-images-{job.request_id}", daemon=True).start()

    def _fetch(self, job: PrefetchJob) -> None:
        images: list[Any] = []
        error: str | None = None
        try:
            images = self.load(job.image_sources, job.halt)
        except ImageError as exc:
            error = str(exc)
        except Exception:
            logger.exception("request %s: loading its images failed", job.request_id)
            error = FETCH_FAILED
        self.deliver(job, None if error is not None else images, error)
