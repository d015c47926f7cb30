"""What the test nodes share: logging, request parsing and a file of received cancels.

These are plain scripts that ``dora run`` starts (``path: tests/nodes/<name>.py``);
they speak the wire protocol through ``openai_stream_protocol`` like any
third-party node would.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from openai_stream_protocol import (
    CANCEL_OUTPUT,
    REQUEST_OUTPUT,
    cancelled_request_id,
    last_user_text,
    parse_request_texts,
    request_id_of,
    split_tokens,
    string_array,
    texts_of,
)

__all__ = [
    "CANCEL_OUTPUT",
    "CHUNKS_OUTPUT",
    "REQUEST_OUTPUT",
    "CancelLog",
    "env_float",
    "env_int",
    "request_of",
    "send_chunk",
    "setup",
]

CHUNKS_OUTPUT = "chunks"

logger = logging.getLogger("test-node")


def setup(name: str) -> logging.Logger:
    logging.basicConfig(level=os.environ.get("TEST_NODE_LOG_LEVEL", "INFO"), format=f"%(levelname)s {name}: %(message)s")
    return logger


def env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


def env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


class CancelLog:
    """Appends each cancelled request id to ``$CANCEL_LOG`` (one per line), so a test can count them."""

    def __init__(self) -> None:
        self.path = os.environ.get("CANCEL_LOG")

    def handle(self, event: Mapping[str, Any]) -> str | None:
        request_id = cancelled_request_id(event["value"], event.get("metadata") or {})
        logger.info("cancel %s", request_id)
        if self.path and request_id:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(request_id + "\n")
        return request_id


def request_of(event: Mapping[str, Any]) -> tuple[str | None, list[str]]:
    """The request id and the echo tokens (the last user text, split like echo_stream)."""
    metadata = event.get("metadata") or {}
    text = last_user_text(parse_request_texts(texts_of(event["value"])))
    return request_id_of(metadata), split_tokens(text)


def send_chunk(node: Any, request_id: str, seq: int, text: str, *, fin: bool = False, **extra: Any) -> None:
    """One chunk with an explicit ``seq`` (the chaos node sends them out of order; never ``flush``)."""
    metadata: dict[str, Any] = {"request_id": request_id, "session_id": request_id, "seq": seq, **extra}
    if fin:
        metadata.update(fin=True, finish_reason="stop")
    node.send_output(CHUNKS_OUTPUT, string_array([text]), metadata)
