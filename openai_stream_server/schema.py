"""Request models (pydantic v2): accept what the OpenAI SDK sends, reject what we cannot serve.

Unknown fields are ignored, not rejected, as vLLM and the OpenAI API do.
Validation runs in JSON mode and strict, so ``"max_tokens": "5"`` is a type
error rather than silently coerced; errors are turned into ``InvalidRequest``
with ``param`` naming the field (``messages[0].content[1].type``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from openai_stream_protocol import Part

from .errors import InvalidRequest


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


class ImageUrl(_Model):
    url: Annotated[str, Field(min_length=1)]
    detail: str | None = None


class ContentPart(_Model):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageUrl | None = None

    @model_validator(mode="after")
    def _has_payload(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs 'text'")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs 'image_url'")
        return self


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _content_allowed(self) -> Message:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs 'content'")
        if isinstance(self.content, list) and self.role != "user":
            for part in self.content:
                if part.type != "text":
                    raise ValueError(f"a {self.role} message may only hold text parts")
        return self

    def parts(self) -> list[Part]:
        role = "system" if self.role == "developer" else self.role
        if self.content is None:
            return []
        if isinstance(self.content, str):
            return [Part(role, "text", self.content)]
        return [
            Part(role, "image", p.image_url.url)
            if p.image_url is not None and p.type == "image_url"
            else Part(role, "text", p.text or "")
            for p in self.content
        ]


# Integers travel to the node as dora metadata, which holds i64: dora-rs 1.1.0's send_output raises
# OverflowError beyond it, which would turn a bad request into a 503 (found by tests/unit/test_fuzz.py).
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1

# The model name is echoed in every chunk and logged once per completion: keep it bounded.
MAX_MODEL_CHARS = 256


class StreamOptions(_Model):
    include_usage: bool = False


class ChatCompletionRequest(_Model):
    messages: Annotated[list[Message], Field(min_length=1)]
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=_I64_MAX)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1, le=_I64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=_I64_MIN, le=_I64_MAX)] | None = None
    background: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def parts(self) -> list[Part]:
        return [part for message in self.messages for part in message.parts()]


_FIELDS = {
    name for model in (ImageUrl, ContentPart, Message, StreamOptions, ChatCompletionRequest) for name in model.model_fields
}

_CODES = {
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
    "json_type": "invalid_json",
    "literal_error": "invalid_value",
    "too_short": "invalid_value",
    "too_long": "invalid_value",
    "greater_than_equal": "invalid_value",
    "less_than_equal": "invalid_value",
}


def _param(loc: tuple[int | str, ...]) -> str | None:
    """``('messages', 0, 'list[ContentPart]', 1, 'type')`` -> ``messages[0].content[1].type``.

    Union members add their own tags to pydantic's location; only field names
    and list indices name something in the request.
    """
    text = ""
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        elif item in _FIELDS:
            text += f".{item}" if text else item
    return text or None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    """Validate a request body; raises ``InvalidRequest`` naming the first offending field."""
    try:
        return ChatCompletionRequest.model_validate_json(body)
    except ValidationError as exc:
        error = _first_relevant(exc.errors(include_url=False))
        param = _param(tuple(error["loc"]))
        kind = error["type"]
        if kind in ("json_invalid", "json_type"):
            raise InvalidRequest("The request body is not a valid JSON object.", code="invalid_json") from None
        code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
        where = f"'{param}'" if param else "the request body"
        raise InvalidRequest(f"Invalid value for {where}: {error['msg']}", param=param, code=code) from None


def _first_relevant(errors: list[Any]) -> Any:
    """Of a union's alternatives pydantic reports each; prefer the one that went deepest into the value."""
    return max(errors, key=lambda e: len(e["loc"]))
