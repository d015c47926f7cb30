"""/v1/completions, the legacy text completion API: one prompt in, ``text_completion`` JSON or SSE out.

The prompt goes downstream as one user text part, so every node that answers chat answers this too
(docs/architecture.md, "HTTP API", "/v1/completions"). What a chat-only server cannot mean is refused
with 400 naming the field: several prompts or token arrays, ``echo``, ``logprobs``, ``suffix``,
``n`` above 1. The stream is the chat stream's loop (``chat_stream.chunk_events``) with another
encoder: no role chunk, the text in ``choices[0].text``. There is no background mode and no
reattach: those are chat extensions.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any

import orjson
from pydantic import Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part

from ..schema import I64_MAX, I64_MIN, MAX_MODEL_CHARS, StrictModel, field_names, parse_json
from ..state import StreamState
from .chat_request import StreamOptions
from .chat_stream import ChunkEncoder, chunk_events
from .common import read_body
from .dispatch import sampling_metadata
from .surface import Surface

SURFACE = "completions"


def new_request_id() -> str:
    return "cmpl-" + secrets.token_hex(12)


# -- the request ---------------------------------------------------------------


class CompletionRequest(StrictModel):
    prompt: str
    """A string, or a list of exactly one string (unwrapped by ``_one_prompt``)."""
    model: Annotated[str, Field(max_length=MAX_MODEL_CHARS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Annotated[int, Field(ge=1, le=I64_MAX)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    n: Annotated[int, Field(ge=1, le=1)] | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
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

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


_FIELDS = field_names(StreamOptions, CompletionRequest)


def parse_completion_request(body: bytes) -> CompletionRequest:
    """Validate a /v1/completions body; raises ``InvalidRequest`` naming the first offending field."""
    return parse_json(CompletionRequest, body, _FIELDS)


# -- the answer ------------------------------------------------------------------


def completion_body(state: StreamState) -> dict[str, Any]:
    """The ``text_completion`` object of a completed answer."""
    return {
        "id": state.request_id,
        "object": "text_completion",
        "created": state.created,
        "model": state.model,
        "system_fingerprint": None,
        "choices": [{"text": state.text, "index": 0, "logprobs": None, "finish_reason": state.finish_reason}],
        "usage": state.usage,
    }


class TextCompletionEncoder(ChunkEncoder):
    """``text_completion`` chunks for ``chunk_events``: no role chunk, the text in ``choices[0].text``.

    Never resumable (no reattach on this surface), so ``seq`` only keeps the signature.
    """

    __slots__ = ()

    OBJECT = "text_completion"

    def role(self) -> None:
        return None

    def content(self, text: str, seq: int | None = None, sent_at: float | None = None) -> bytes:
        # ``x_sent_at`` (benchmarks only, ``relay_sent_at``): as ``ChunkEncoder.content``.
        stamp = b',"x_sent_at":' + orjson.dumps(sent_at) if sent_at is not None and self.relay_sent_at else b""
        return (
            b"data: "
            + self._head
            + b',"choices":[{"text":'
            + orjson.dumps(text)
            + b',"index":0,"logprobs":null,"finish_reason":null}]'
            + stamp
            + self._tail
        )

    def finish(self, finish_reason: str, seq: int | None = None, usage: dict[str, Any] | None = None) -> bytes:
        return (
            b"data: "
            + self._head
            + b',"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":'
            + orjson.dumps(finish_reason)
            + b"}]"
            + self._tail
        )


# -- the route -------------------------------------------------------------------


class Completions(Surface):
    """The /v1/completions route."""

    name = SURFACE
    new_id = staticmethod(new_request_id)

    def routes(self) -> list[Route]:
        return [Route("/v1/completions", self.create, methods=["POST"])]

    async def _create(self, request: Request, request_id: str) -> Response:
        body = parse_completion_request(await read_body(request, self.settings.max_body_bytes))
        model = self.dispatcher.model(body.model)
        parts = [Part("user", "text", body.prompt)]
        state = await self.dispatcher.submit(request_id, self.name, model, parts, self._metadata(body, model, request_id))
        headers = {"X-Request-Id": request_id}
        if not body.stream:
            await self.dispatcher.gathered(request, state)
            return JSONResponse(completion_body(state), headers=headers)
        await self.dispatcher.first_chunk(request, state)
        encoder = TextCompletionEncoder(
            request_id, model, state.created, include_usage=body.include_usage, relay_sent_at=self.settings.relay_sent_at
        )
        events = chunk_events(state, encoder, self.metrics, on_early_close=lambda: self.dispatcher.cancel(request_id))
        return self.sse(events, headers)

    @staticmethod
    def _metadata(body: CompletionRequest, model: str, request_id: str) -> dict[str, Any]:
        stop = body.stop
        return sampling_metadata(
            request_id,
            model,
            stream=body.stream,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=[stop] if isinstance(stop, str) else (list(stop) if stop is not None else None),
            seed=body.seed,
        )
