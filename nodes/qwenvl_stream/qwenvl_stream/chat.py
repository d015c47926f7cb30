"""Request texts (the dora-hub flattening) back into a chat for the model's template.

The flattening keeps one element per message part but not the message
boundaries, so consecutive parts of one role become one message, in order:
a user turn of an image and a question stays one turn, as the client sent
it. Images become ``{"type": "image"}`` placeholders (what Qwen2.5-VL's chat
template expands to ``<|vision_start|><|image_pad|><|vision_end|>``) and
their sources are returned in the same order, for the processor.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from openai_stream_protocol import Part

Message = dict[str, Any]


@dataclass(slots=True)
class Chat:
    messages: list[Message] = field(default_factory=list)
    image_sources: list[str] = field(default_factory=list)


def to_chat(parts: Iterable[Part]) -> Chat:
    chat = Chat()
    for part in parts:
        if part.kind == "image":
            chat.image_sources.append(part.content)
            item: dict[str, Any] = {"type": "image"}
        else:
            item = {"type": "text", "text": part.content}
        if chat.messages and chat.messages[-1]["role"] == part.role:
            chat.messages[-1]["content"].append(item)
        else:
            chat.messages.append({"role": part.role, "content": [item]})
    return chat
