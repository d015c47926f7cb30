"""/v1/chat/completions: create (JSON, SSE or background), and by id: retrieve, reattach, cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part, ReasoningRequest

from ...errors import ApiError
from ...state import Status, StreamState
from ..common import check_images, sequence_number
from ..dispatch import failed_state, queued_comment, sampling_metadata
from ..follow import follow
from ..reasoning import reasoning_metadata
from ..surface import Surface, by_id
from ..surfaces import CHAT
from ..tools import tool_metadata
from .render import ChunkEncoder, ChunkRenderer, completion_body
from .request import ChatCompletionRequest, include_usage, parse_chat_request


class ChatCompletions(Surface):
    """The chat completion routes."""

    spec = CHAT

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.create, methods=["POST"]),
            Route("/v1/chat/completions/{request_id}", self.retrieve),
            Route("/v1/chat/completions/{request_id}/stream", self.stream),
            Route("/v1/chat/completions/{request_id}/cancel", self.cancel, methods=["POST"]),
        ]

    # -- POST /v1/chat/completions -----------------------------------------

    async def _create(self, request: Request, request_id: str) -> Response:
        body, model, parts, metadata = await self.dispatcher.admission.body(request, lambda raw: self._prepare(raw, request_id))
        ticket = self.dispatcher.enter(model, body.service_tier)  # its model group's queue (docs/team.md)
        headers = {"X-Request-Id": request_id}
        if ticket.waiting and body.stream and not body.background:
            # It waits with its headers out, and learns its place: ": queued N" comment lines.
            async def opened() -> AsyncIterator[bytes]:
                state = await self.dispatcher.submit(request_id, self.name, model, parts, metadata, ticket=ticket)
                return self._events(body, model, state)

            def failed(error: ApiError) -> AsyncIterator[bytes]:
                state = self.registry.get(request_id) or failed_state(request_id, model, self.name, error)
                return self._events(body, model, state)

            return self.sse(self.dispatcher.queued_stream(ticket, queued_comment, opened, failed), headers)
        await self.dispatcher.admitted(request, ticket)
        state = await self.dispatcher.submit(request_id, self.name, model, parts, metadata, ticket=ticket)
        if body.background:
            return JSONResponse(
                {
                    "id": request_id,
                    "object": "chat.completion",
                    "created": state.created,
                    "model": model,
                    "status": Status.IN_PROGRESS.value,
                    "stream_url": f"/v1/chat/completions/{request_id}/stream",
                },
                status_code=202,
                headers=headers,
            )
        if not body.stream:
            await self.dispatcher.gathered(request, state)
            gathered = completion_body(state, self.settings.reasoning_field)
            del gathered["status"]
            return JSONResponse(gathered, headers=headers)
        await self.dispatcher.first_chunk(request, state)
        return self.sse(self._events(body, model, state), headers)

    def _events(self, body: ChatCompletionRequest, model: str, state: StreamState) -> AsyncIterator[bytes]:
        """A POST's stream of chunks; the client leaving cancels it."""
        request_id = state.request_id
        encoder = ChunkEncoder(
            request_id,
            model,
            state.created,
            include_usage=include_usage(body.stream_options),
            relay_sent_at=self.settings.relay_sent_at,
            reasoning_field=self.settings.reasoning_field,
            service_tier=state.service_tier,
        )
        return follow(ChunkRenderer(state, encoder), self.metrics, on_early_close=lambda: self.dispatcher.cancel(request_id))

    def _prepare(self, raw: bytes, request_id: str) -> tuple[ChatCompletionRequest, str, list[Part], dict[str, Any]]:
        """What the request needs before it opens, from its body alone: it may run off the loop (``admission``)."""
        body = parse_chat_request(raw)
        check_images(body.image_fields(), self.settings.max_images_per_request)
        model = self.dispatcher.model(body.model)
        return body, model, body.parts(), self._metadata(body, model, request_id)

    @staticmethod
    def _metadata(body: ChatCompletionRequest, model: str, request_id: str) -> dict[str, Any]:
        tools = tool_metadata(body.tools, body.tool_choice, body.parallel_tool_calls)
        wish = None if body.reasoning_effort is None else ReasoningRequest(body.reasoning_effort)
        return {**tools, **reasoning_metadata(wish)} | sampling_metadata(
            request_id,
            model,
            stream=body.stream or body.background,
            max_tokens=body.token_limit,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            seed=body.seed,
        )

    # -- by id ---------------------------------------------------------------

    @by_id
    async def stream(self, request: Request, state: StreamState) -> Response:
        """GET .../{id}/stream: (re)attach from the start or after ``Last-Event-ID`` / ``starting_after``."""
        after = sequence_number(request.headers.get("last-event-id") or request.query_params.get("starting_after"))
        encoder = ChunkEncoder(
            state.request_id, state.model, state.created, resumable=True, reasoning_field=self.settings.reasoning_field
        )
        renderer = ChunkRenderer(state, encoder, after=after, retry_ms=self.settings.sse_retry_ms)
        events = follow(renderer, self.metrics, max_events=self.settings.close_stream_after_events)
        return self.sse(events, {"X-Request-Id": state.request_id})

    @by_id
    async def retrieve(self, request: Request, state: StreamState) -> Response:
        return JSONResponse(completion_body(state, self.settings.reasoning_field), headers={"X-Request-Id": state.request_id})

    @by_id
    async def cancel(self, request: Request, state: StreamState) -> Response:
        await self.dispatcher.cancel_anywhere(state.request_id)
        return JSONResponse(completion_body(state, self.settings.reasoning_field), headers={"X-Request-Id": state.request_id})
