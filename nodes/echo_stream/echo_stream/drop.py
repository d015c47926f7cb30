"""``ECHO_DROP_EVERY`` (tests only): lose every Nth chunk message on the way out, as a congested transport would.

Between machines dora can drop a message when a daemon's publish channel is full (docs/architecture.md,
"Facts measured"); this makes that loss happen on purpose, on one host and in one process, so that the
server's resend path (docs/architecture.md, "Resend") can be tested. Off unless the variable is set.

Only chunk messages count and are dropped: a single chunk (metadata with ``seq``) or a batch (a struct
array). Hellos, heartbeats, ``resend_missed`` answers and messages sent again (``resent: true``) always
go through, so that a lost chunk is lost once, never again on its resend.
"""

from __future__ import annotations

import logging
from typing import Any

import pyarrow as pa

from openai_stream_protocol import RESENT_KEY, OutputSender

logger = logging.getLogger(__name__)


class DropEvery:
    """Stands between a node's senders and ``dora.Node``: the ``every``-th chunk message (and each after it) is not sent."""

    def __init__(self, node: OutputSender, every: int) -> None:
        if every < 2:
            raise ValueError(f"ECHO_DROP_EVERY must be 0 (off) or at least 2, got {every}")
        self.node = node
        self.every = every
        self.counted = 0
        """Chunk messages seen (first sends only)."""
        self.dropped = 0

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        if isinstance(data, pa.StructArray) or (metadata is not None and "seq" in metadata):
            if not (metadata and metadata.get(RESENT_KEY)):
                self.counted += 1
                if self.counted % self.every == 0:
                    self.dropped += 1
                    logger.debug("dropped chunk message %d (ECHO_DROP_EVERY=%d)", self.counted, self.every)
                    return
        self.node.send_output(output_id, data, metadata)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.node, name)
