"""Admission: a request body is judged by its size before it is parsed, and a large one is parsed off the event loop.

Parsing, validating and estimating the tokens of a large legal body is seconds of CPU on the
event loop, where every other client waits (``/health`` included): an 8 MB chat body of 200,000
one-word messages costs ~0.5 s in pydantic and ~0.45 s more to turn into parts. So
(docs/architecture.md, "Admission"):

- before the body is read, a request is refused when the requests in flight and being read are
  at ``--max-active-requests`` (429), or when its declared size (else the size read) would take
  what the server holds past the share of ``--max-total-bytes`` new requests may take (503
  ``server_overloaded`` with ``Retry-After``, as ``StreamRegistry.open`` refuses);
- the body's bytes count in the registry's ledger from then until the route that read it has
  returned (``release``): its parsed form lives that long, through a wait for a live replica too;
- a body of ``OFFLOAD_BYTES`` or more is turned into what the route needs (``prepare``: parsed,
  validated, its parts and metadata made) on one worker thread, so the loop keeps serving; one
  thread, so that large bodies queue behind each other instead of all taking the GIL from the
  loop at once. Smaller bodies are prepared inline, where the hand-over would cost more than it
  saves.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from starlette.requests import Request

from openai_stream_protocol import Part, split_tokens

from .api.common import read_body
from .errors import BodyTooLarge, TooManyRequests

if TYPE_CHECKING:
    from .registry import StreamRegistry
    from .settings import Settings

T = TypeVar("T")

OFFLOAD_BYTES = 16 * 1024
"""Bodies (and prompts) of at least this many bytes are prepared on the worker thread.

Measured on the 2-core test machine: the hand-over costs ~27 us; preparing a 16 KiB chat body
costs ~1.1 ms in its costliest shape (one-word messages; 64 KiB: ~4.8 ms) and ~10 us as a few
long messages. Below it a body costs the loop at most about a millisecond, and the small
requests of the hot path stay inline (docs/architecture.md, "Admission").
"""

OFFLOAD_PARTS = 1024
"""A prompt of this many parts or more is encoded and counted on the worker thread whatever its size."""

_HELD = "oss.admitted_bytes"
"""The scope key under which a request's counted body bytes wait for ``release``."""


class Admission:
    """The admission checks and the worker thread for one app (``Dispatcher.admission``)."""

    def __init__(self, settings: Settings, registry: StreamRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.reading = 0
        """Requests admitted whose body is being read or prepared: they count against ``--max-active-requests``
        with those in flight, since each holds its body already."""
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oss-admission")
        self._encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="oss-encode")
        """A thread of its own for encoding prompts: a request whose body was prepared must not wait behind the
        bodies queued after it (eight 7 MB bodies posted at once: the first was answered after ~1.5 s, not ~7 s)."""

    async def body(self, request: Request, prepare: Callable[[bytes], T], *, hold: bool = True) -> T:
        """``prepare(body)`` of the request's body, read under the admission checks (see the module docstring).

        ``hold``: its bytes stay counted until ``release(request)`` (the route keeps what ``prepare``
        made); else only while it is read and prepared. Raises ``ApiError`` (429, 503, 413, or what
        ``prepare`` raises: a 400 naming the field) with nothing left counted.
        """
        settings, registry = self.settings, self.registry
        if len(registry.active) + self.reading >= settings.max_active_requests:
            raise TooManyRequests(
                f"{len(registry.active)} requests in flight and {self.reading} being read (limit {settings.max_active_requests})"
            )
        declared = declared_bytes(request)
        if declared > settings.max_body_bytes:
            raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {settings.max_body_bytes}")
        registry.reserve(declared)
        counted = declared
        self.reading += 1
        try:
            raw = await read_body(request, settings.max_body_bytes)
            if len(raw) != counted:  # sent without a length (chunked), or shorter than declared: count what came
                registry.unreserve(counted)
                counted = 0
                registry.reserve(len(raw))
                counted = len(raw)
            prepared = await self._offload(self._worker, len(raw), prepare, raw)
        except BaseException:
            registry.unreserve(counted)
            raise
        finally:
            self.reading -= 1
        if hold:
            request.scope[_HELD] = request.scope.get(_HELD, 0) + counted
        else:
            registry.unreserve(counted)
        return prepared

    def release(self, request: Request) -> None:
        """The route that read the body has returned: its bytes no longer count here (what it opened counts its own)."""
        counted = request.scope.pop(_HELD, 0)
        if counted:
            self.registry.unreserve(counted)

    async def encoded(self, parts: Sequence[Part]) -> tuple[int, list[str]]:
        """A prompt's token estimate and its texts in the wire form (``encode_prompt``), off the loop when it is large."""
        size = OFFLOAD_BYTES if len(parts) >= OFFLOAD_PARTS else sum(len(part.content) for part in parts)
        return await self._offload(self._encoder, size, encode_prompt, parts)

    @staticmethod
    async def _offload(thread: ThreadPoolExecutor, nbytes: int, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)``, on ``thread`` when ``nbytes`` (the size of what it works on) is ``OFFLOAD_BYTES`` or more."""
        if nbytes < OFFLOAD_BYTES:
            return work(*args)
        return await asyncio.get_running_loop().run_in_executor(thread, work, *args)


def encode_prompt(parts: Sequence[Part]) -> tuple[int, list[str]]:
    """The server's token estimate of a prompt (whitespace-split words of its parts) and its texts in the wire form."""
    return sum(len(split_tokens(part.content)) for part in parts), [part.encode() for part in parts]


def declared_bytes(request: Request) -> int:
    """The body size the request declares (``Content-Length``), 0 when it declares none or nonsense (then what is
    read counts)."""
    declared = request.headers.get("content-length")
    # isascii: "\xb2".isdigit() is true and int() refuses it (a 500 the fuzz found)
    if declared is None or not declared.isascii() or not declared.isdigit():
        return 0
    return int(declared)
