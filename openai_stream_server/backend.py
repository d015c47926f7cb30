"""The seam between the HTTP layer and whatever answers requests.

The HTTP layer talks to the dora bridge (``bridge.DoraBridge``) and to the
test fake only through ``Backend``, as httpx's client talks only to its
transport.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from openai_stream_protocol import Chunk

from .errors import ChatCompletionError

ChunkSink = Callable[[list[Chunk]], None]
"""Receives batches of chunks on the event loop thread (``StreamRegistry.deliver``)."""

OnLost = Callable[[ChatCompletionError], None]
"""Every node that answers is gone: requests in flight end with the error (``StreamRegistry.fail_all``)."""


@dataclass(frozen=True, slots=True)
class DownstreamRequest:
    """One request as it travels to the model node (docs/architecture.md, Dora wire protocol)."""

    request_id: str
    texts: list[str]
    metadata: dict[str, Any]


class Backend(Protocol):
    async def start(self, sink: ChunkSink, on_stop: Callable[[], None], on_lost: OnLost) -> None:
        """Begin delivering chunks to ``sink``; call ``on_stop`` when the dataflow stops, ``on_lost`` when
        the model nodes are gone while it runs (a crash), so that no client waits out a timeout."""

    def submit(self, request: DownstreamRequest) -> None:
        """Send a request downstream; raises ``BackendUnavailable`` when it cannot."""

    def cancel(self, request_id: str) -> None:
        """Tell downstream nodes to stop working on a request."""

    def health(self) -> dict[str, Any]:
        """``connected`` and whatever else tells whether events are flowing."""

    async def aclose(self) -> None: ...
