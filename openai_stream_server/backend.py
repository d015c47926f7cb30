"""The seam between the HTTP layer and whatever answers requests.

The HTTP layer talks to the dora bridge (``bridge.DoraBridge``) and to the
test fake only through ``Backend``, as httpx's client talks only to its
transport.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from openai_stream_protocol import Chunk

from .errors import ApiError

if TYPE_CHECKING:
    from .replicas import Replica

ChunkSink = Callable[[list[Chunk]], None]
"""Receives batches of chunks on the event loop thread (``StreamRegistry.deliver``)."""

OnLost = Callable[[ApiError], None]
"""Every node that answers is gone: requests in flight end with the error (``StreamRegistry.fail_all``)."""

OnOrphaned = Callable[[list[str], ApiError, str], None]
"""A model replica died (its inputs closed, dora restarted it, or it went silent): ``(request ids it held, why, replica id)``.

The ids are the wire ids the requests were submitted with. The backend has already forgotten them;
the registry re-sends each elsewhere, with the pieces already delivered when there are some (a
continuation), or fails it (docs/architecture.md, "Failover").
"""


@dataclass(frozen=True, slots=True)
class DownstreamRequest:
    """One request as it travels to the model node (docs/architecture.md, Dora wire protocol)."""

    request_id: str
    """The id on the wire: the completion id, or ``<completion id>~<attempt>`` for a re-sent request."""
    texts: list[str]
    metadata: dict[str, Any]
    retry_of: str | None = None
    """A re-send after replica ``retry_of`` failed it: another live replica is preferred (and counted as a retry)."""
    avoid: tuple[str, ...] = ()
    """Replicas that already failed this request: used again only when no other is live."""
    continuing: bool = False
    """The metadata carries a continuation (``continue_from``): only a replica that said ``can_continue`` may take it."""


class Backend(Protocol):
    malformed_chunks: int
    """Chunks it could not read (a bad ``seq`` or metadata) and dropped; ``/metrics`` exports the count."""

    async def start(
        self, sink: ChunkSink, on_stop: Callable[[], None], on_lost: OnLost, on_orphaned: OnOrphaned | None = None
    ) -> None:
        """Begin delivering chunks to ``sink``; call ``on_stop`` when the dataflow stops. When a replica
        dies, hand its requests to ``on_orphaned``; without it (or a backend without replicas), call
        ``on_lost`` once every model node is gone, so that no client waits out a timeout."""

    def submit(self, request: DownstreamRequest) -> None:
        """Send a request downstream (to one replica); raises ``BackendUnavailable`` when it cannot."""

    async def wait_live(self, timeout_s: float) -> bool:
        """Return True at once while a model replica is live, else once one is, False after ``timeout_s``."""

    def cancel(self, request_id: str) -> None:
        """Tell the node working on a request to stop (only the replica that holds it)."""

    def release(self, request_id: str, completed: bool) -> None:
        """The request ended: it no longer counts as in flight on its replica (``completed``: served)."""

    def replica_failed(self, request_id: str) -> str | None:
        """The replica holding the request failed it (busy, no first chunk in time): that counts against it, the
        request leaves it (with a ``cancel``); returns the replica's id (None: nobody held it)."""

    def can_retry(self, request_id: str, *, continuing: bool) -> bool:
        """Whether a live replica other than the one holding the request could take it (one that can continue it,
        with ``continuing``)."""

    def health(self) -> dict[str, Any]:
        """``connected`` and whatever else tells whether events are flowing."""

    def replica_stats(self) -> list[Replica]:
        """The model replicas, for the per-replica series of ``/metrics`` (empty for a backend without replicas)."""

    async def aclose(self) -> None: ...
