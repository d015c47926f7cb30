"""/v1/messages (Anthropic Messages API): create (JSON or SSE) and count_tokens.

The request becomes the same parts and metadata as a chat completion (``request``), the
completion is the same ``StreamState``; what differs is the shape (``render``): a ``message``
object with content blocks, and a stream of named events (docs/architecture.md, "Anthropic
Messages API"). Every error on these paths is Anthropic-shaped (``surfaces.MESSAGES``).
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part

from ...errors import ApiError, InvalidRequest, MethodNotAllowed, NotFound
from ...state import StreamState
from ..common import check_images
from ..dispatch import prompt_tokens, queued_comment, sampling_metadata
from ..follow import follow
from ..reasoning import reasoning_metadata
from ..surface import Surface
from ..surfaces import MESSAGES
from ..tools import tool_metadata
from .render import MessageRenderer, message_body
from .request import MessagesRequest, PromptRequest, parse_count_tokens_request, parse_messages_request

_ANY_METHOD = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
"""A function route answers GET (and HEAD) alone unless given its methods."""


class Messages(Surface):
    """The /v1/messages routes; any other method or path under it gets an Anthropic-shaped 405 or 404."""

    spec = MESSAGES

    def routes(self) -> list[Route]:
        return [
            Route("/v1/messages", self.create, methods=["POST"]),
            Route("/v1/messages/count_tokens", self.count_tokens, methods=["POST"]),
            # Starlette prefers a full match (path and method) to these, which take everything else.
            Route("/v1/messages", self.unrouted, methods=_ANY_METHOD),
            Route("/v1/messages/{rest:path}", self.unrouted, methods=_ANY_METHOD),
        ]

    async def _create(self, request: Request, message_id: str) -> Response:
        body, model, parts, metadata = await self.dispatcher.admission.body(request, lambda raw: self._prepare(raw, message_id))
        # Anthropic's "standard_only" is the default tier; OpenAI's names are taken too (docs/team.md, "Queue and tiers").
        tier = "default" if body.service_tier == "standard_only" else body.service_tier
        ticket = self.dispatcher.enter(model, tier)  # its model group's queue
        headers = {"X-Request-Id": message_id, "request-id": message_id}
        if ticket.waiting and body.stream:  # it waits with its headers out, and learns its place: ": queued N"
            submit = functools.partial(self.dispatcher.submit, message_id, self.name, model, parts, metadata, ticket=ticket)
            events = self.dispatcher.queued_stream(
                ticket, queued_comment, submit, self._events, request_id=message_id, model=model, surface=self.name
            )
            return self.sse(events, headers)
        await self.dispatcher.admitted(request, ticket)
        state = await self.dispatcher.submit(message_id, self.name, model, parts, metadata, ticket=ticket)
        if not body.stream:
            await self.dispatcher.gathered(request, state)
            return JSONResponse(message_body(state), headers=headers)
        await self.dispatcher.first_chunk(request, state)
        return self.sse(self._events(state), headers)

    def _events(self, state: StreamState) -> AsyncIterator[bytes]:
        """A POST's stream of events; the client leaving cancels it."""
        message_id = state.request_id
        return follow(MessageRenderer(state), self.metrics, on_early_close=lambda: self.dispatcher.cancel(message_id))

    def _prepare(self, raw: bytes, message_id: str) -> tuple[MessagesRequest, str, list[Part], dict[str, Any]]:
        """What the request needs before it opens, from its body alone: it may run off the loop (``admission``)."""
        body = parse_messages_request(raw)
        check_images(body.image_fields(), self.settings.max_images_per_request)
        model = self.dispatcher.model(body.model)
        wish = None if body.thinking is None else body.thinking.wish()
        metadata = {**self._tools(body), **reasoning_metadata(wish)} | sampling_metadata(
            message_id,
            model,
            stream=body.stream,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_sequences,
        )
        return body, model, body.parts(), metadata

    @staticmethod
    def _tools(body: PromptRequest) -> dict[str, Any]:
        """The tools' request metadata (the chat wire form); 400 for a choice no tool can meet."""
        choice = body.tool_choice
        names = {tool.name for tool in body.tools or ()}
        if choice is not None and choice.type == "any" and not names:
            raise InvalidRequest("tool_choice 'any' needs at least one tool in 'tools'", param="tool_choice.type")
        if choice is not None and choice.type == "tool" and choice.name not in names:
            raise InvalidRequest(f"tool_choice names the tool '{choice.name}', which is not in 'tools'", param="tool_choice.name")
        openai_choice = None if choice is None else choice.openai()
        return tool_metadata(body.function_tools(), openai_choice, body.parallel_tool_calls, choice_param=body.choice_param)

    async def count_tokens(self, request: Request) -> Response:
        """The server's estimate of the prompt's tokens: the parts (system included) and the tools' JSON."""
        try:
            # The same admission and off-loop work as a request that opens a completion (docs/architecture.md, "Admission").
            count = await self.dispatcher.admission.body(request, self._count_tokens, hold=False)
        except ApiError as error:
            return self.error_response(error)
        return JSONResponse({"input_tokens": count})

    def _count_tokens(self, raw: bytes) -> int:
        body = parse_count_tokens_request(raw)
        self.dispatcher.model(body.model)
        tools = self._tools(body).get("tools")
        parts = body.parts() + ([Part("system", "text", tools)] if tools else [])
        return prompt_tokens(parts)

    async def unrouted(self, request: Request) -> Response:
        if request.url.path in ("/v1/messages", "/v1/messages/count_tokens"):
            return self.error_response(MethodNotAllowed(f"Method {request.method[:20]} is not allowed here; use POST."))
        return self.error_response(NotFound(f"Not found: {request.url.path[:200]!r}."))
