"""The /v1/completions request model (validation rules: ``schema``).

One prompt: a string, or a list of exactly one string. What a chat-only server cannot mean is refused
with 400 naming the field: several prompts or token arrays, ``echo``, ``logprobs``, ``suffix``, ``n``
above 1 (docs/architecture.md, "/v1/completions").
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, field_validator

from openai_stream_protocol import Part

from ...schema import I64_MAX, I64_MIN, MAX_MODEL_CHARS, OpenAIStop, StrictModel, field_names, parse_json
from ..chat.request import StreamOptions


class CompletionRequest(StrictModel):
    prompt: str
    """A string, or a list of exactly one string (unwrapped by ``_one_prompt``)."""
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    stream: bool = False
    service_tier: Annotated[str, Field(max_length=16)] | None = None
    """Its place in the model group's queue (``gateway/queue.py``): ``auto``, ``priority``, ``default``, ``flex``."""
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=I64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stop: OpenAIStop | None = None
    seed: Annotated[int, Field(ge=I64_MIN, le=I64_MAX)] | None = None
    echo: bool | None = None
    logprobs: Any = None
    suffix: Any = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return value[0]
        if isinstance(value, str):
            return value
        raise ValueError("must be a string or a list of one string; token arrays and several prompts are not supported")

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("echo is not supported: the completion never repeats the prompt; leave it false")
        return value

    @field_validator("logprobs", "suffix", mode="before")
    @classmethod
    def _null_only(cls, value: Any) -> Any:
        if value is not None:
            raise ValueError("not supported by this server; leave it null")
        return value

    def parts(self) -> list[Part]:
        """The prompt as the one user text part every chat node answers."""
        return [Part("user", "text", self.prompt)]


_FIELDS = field_names(StreamOptions, CompletionRequest)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Validate a /v1/completions body; raises ``InvalidRequest`` naming the first offending field."""
    return parse_json(CompletionRequest, body, _FIELDS)
