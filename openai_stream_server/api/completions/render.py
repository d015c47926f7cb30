"""A text completion rendered: the ``text_completion`` object, and its chunks for the chat stream's ``ChunkRenderer``.

No role chunk, the text in ``choices[0].text``; never resumable (no reattach on this surface).
"""

from __future__ import annotations

from typing import Any

import orjson

from ...state import StreamState
from ..chat.render import ChunkEncoder, chat_usage


def completion_body(state: StreamState) -> dict[str, Any]:
    """The ``text_completion`` object of a completed answer."""
    return {
        "id": state.request_id,
        "object": "text_completion",
        "created": state.created,
        "model": state.model,
        "system_fingerprint": None,
        "choices": [{"text": state.log.text, "index": 0, "logprobs": None, "finish_reason": state.log.finish_reason}],
        "usage": chat_usage(state.log),
    }


class TextCompletionEncoder(ChunkEncoder):
    """``text_completion`` chunks: no role chunk, the text in ``choices[0].text``.

    Never resumable (no reattach on this surface), so ``seq`` only keeps the signature.
    """

    __slots__ = ()

    OBJECT = "text_completion"
    CONTENT_HEAD = b',"choices":[{"text":'
    CONTENT_TAIL = b',"index":0,"logprobs":null,"finish_reason":null}]'

    def role(self) -> None:
        return None

    def reasoning(self, text: str, seq: int | None = None) -> None:
        """A text completion has no place for reasoning: only the answer text is sent."""
        return None

    def finish(self, finish_reason: str, seq: int | None = None, usage: dict[str, Any] | None = None) -> bytes:
        return (
            b"data: "
            + self._head
            + b',"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b"}]"
            + self._tail
        )
