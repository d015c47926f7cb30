"""The seam between the HTTP layer and whatever answers requests.

The HTTP layer talks to the dora bridge (``bridge.DoraBridge``) and to the
test fake only through ``Backend``, as httpx's client talks only to its
transport.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from .protocol import Chunk

ChunkSink = Callable[[list[Chunk]], None]
"""Receives batches of chunks on the event loop thread (``StreamRegistry.deliver``)."""


@dataclass(frozen=True, slots=True)
class DownstreamRequest:
    """One request as it travels to the model node (DESIGN.md, Dora wire protocol)."""

    request_id: str
    texts: list[str]
    metadata: dict[str, Any]


class Backend(Protocol):
    async def start(self, sink: ChunkSink, on_stop: Callable[[], None]) -> None:
        """Begin delivering chunks to ``sink``; call ``on_stop`` when the dataflow stops."""

    def submit(self, request: DownstreamRequest) -> None:
        """Send a request downstream; raises ``BackendUnavailable`` when it cannot."""

    def cancel(self, request_id: str) -> None:
        """Tell downstream nodes to stop working on a request."""

    def health(self) -> dict[str, Any]:
        """``connected`` and whatever else tells whether events are flowing."""

    async def aclose(self) -> None: ...
