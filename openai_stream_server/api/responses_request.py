"""The /v1/responses request model (validation rules: ``schema``).

``input`` is a string (one user message) or a list of message items; each item's content is a
string or a list of parts: ``input_text`` and ``input_image`` for user, system and developer
messages, ``output_text`` (and ``input_text``) for assistant ones. Other item types (function
calls, reasoning, ...) are refused with a 400 naming ``input[i].type``.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, model_validator

from openai_stream_protocol import Part

from ..schema import I64_MAX, MAX_MODEL_CHARS, StrictModel, field_names, parse_json

MAX_METADATA_PAIRS = 16
"""As the OpenAI API: at most 16 pairs, keys up to 64 characters, values up to 512."""


class ContentPart(StrictModel):
    type: Literal["input_text", "input_image", "output_text"]
    text: str | None = None
    image_url: Annotated[str, Field(min_length=1)] | None = None
    """A URL or a data URL; ``file_id`` images are not supported."""
    detail: Literal["low", "high", "auto"] | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type in ("input_text", "output_text") and self.text is None:
            raise ValueError(f"an {self.type} part needs 'text'")
        if self.type == "input_image" and self.image_url is None:
            raise ValueError("an input_image part needs 'image_url' (file_id is not supported)")
        return self


class InputMessage(StrictModel):
    type: Literal["message"] = "message"
    role: Literal["user", "system", "developer", "assistant"]
    content: str | list[ContentPart]

    @model_validator(mode="after")
    def _parts_allowed(self) -> InputMessage:
        if isinstance(self.content, list):
            for part in self.content:
                if part.type == "input_image" and self.role != "user":
                    raise ValueError(f"a {self.role} message may not hold images")
                if part.type == "output_text" and self.role != "assistant":
                    raise ValueError("only an assistant message may hold output_text parts")
        return self

    def parts(self) -> list[Part]:
        role = "system" if self.role == "developer" else self.role
        if isinstance(self.content, str):
            return [Part(role, "text", self.content)]
        return [
            Part(role, "image", p.image_url)
            if p.type == "input_image" and p.image_url is not None
            else Part(role, "text", p.text or "")
            for p in self.content
        ]


class ResponsesRequest(StrictModel):
    # The list first: an empty list's error (too short) is then the one reported, not "not a string".
    input: Annotated[list[InputMessage], Field(min_length=1)] | str
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    instructions: str | None = None
    max_output_tokens: Annotated[int, Field(ge=1, le=I64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    stream: bool = False
    background: bool = False
    store: bool = True
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=MAX_METADATA_PAIRS),
        ]
        | None
    ) = None
    previous_response_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None

    def instruction_parts(self) -> list[Part]:
        """``instructions`` as the conversation's first (system) part; not carried over by ``previous_response_id``."""
        return [] if self.instructions is None else [Part("system", "text", self.instructions)]

    def input_parts(self) -> list[Part]:
        if isinstance(self.input, str):
            return [Part("user", "text", self.input)]
        return [part for message in self.input for part in message.parts()]


_FIELDS = field_names(ContentPart, InputMessage, ResponsesRequest)


def parse_responses_request(body: bytes) -> ResponsesRequest:
    """Validate a /v1/responses body; raises ``InvalidRequest`` naming the first offending field."""
    return parse_json(ResponsesRequest, body, _FIELDS)
