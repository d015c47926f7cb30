"""/v1/chat/completions: create (JSON, SSE or background), and by id: retrieve, reattach, cancel."""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part, ReasoningRequest

from ...state import Status, StreamState
from ..common import check_images, sequence_number
from ..dispatch import queued_comment, sampling_metadata
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
            Route("/v1/chat/completions/{request_id}/stream", self.stream_or_queued),
            Route("/v1/chat/completions/{request_id}/cancel", self.cancel_or_dequeue, methods=["POST"]),
        ]

    # -- POST /v1/chat/completions -----------------------------------------

    async def _create(self, request: Request, request_id: str) -> Response:
        body, model, parts, metadata = await self.dispatcher.admission.body(request, lambda raw: self._prepare(raw, request_id))
        ticket = self.dispatcher.enter(model, body.service_tier)  # its model group's queue (docs/team.md)
        headers = {"X-Request-Id": request_id}
        if ticket.waiting and body.stream and not body.background:
            # It waits with its headers out, and learns its place: ": queued N" comment lines.
            submit = functools.partial(self.dispatcher.submit, request_id, self.name, model, parts, metadata, ticket=ticket)
            events = self.dispatcher.queued_stream(
                ticket, queued_comment, submit, lambda state: self._events(body, model, state),
                request_id=request_id, model=model, surface=self.name,
            )  # fmt: skip
            return self.sse(events, headers)
        if ticket.waiting and body.background:  # answered at once: it waits here, and its stream shows its place
            self.dispatcher.submit_later(request_id, self.name, model, parts, metadata, ticket)
            queued = {"status": "queued", "queue_position": ticket.position, "service_tier": ticket.tier}
            return JSONResponse(self._accepted(request_id, model, int(time.time())) | queued, status_code=202, headers=headers)
        await self.dispatcher.admitted(request, ticket)
        state = await self.dispatcher.submit(request_id, self.name, model, parts, metadata, ticket=ticket)
        if body.background:
            return JSONResponse(self._accepted(request_id, model, state.created), status_code=202, headers=headers)
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

    @staticmethod
    def _accepted(request_id: str, model: str, created: int) -> dict[str, Any]:
        return {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "status": Status.IN_PROGRESS.value,
            "stream_url": f"/v1/chat/completions/{request_id}/stream",
        }

    # -- by id ---------------------------------------------------------------

    async def stream_or_queued(self, request: Request) -> Response:
        """GET .../{id}/stream of a background request still in its queue: ``event: queued`` with its place each time
        it moves (an ``EventSource`` delivers named events, not comments), then its stream from the start."""
        request_id = request.path_params["request_id"]
        ticket = self.dispatcher.waiting_ticket(request_id)
        if ticket is None:
            return await self.stream(request)

        async def events() -> AsyncIterator[bytes]:
            async for position in ticket.watch():
                yield b'event: queued\ndata: {"queue_position":%d}\n\n' % position
            state = await self.dispatcher.opened(request_id, self.name)
            if state is None:
                return
            encoder = ChunkEncoder(
                request_id,
                state.model,
                state.created,
                resumable=True,
                reasoning_field=self.settings.reasoning_field,
                service_tier=state.service_tier,
            )
            renderer = ChunkRenderer(state, encoder, retry_ms=self.settings.sse_retry_ms)
            async for event in follow(renderer, self.metrics):
                yield event

        return self.sse(events(), {"X-Request-Id": request_id})

    async def cancel_or_dequeue(self, request: Request) -> Response:
        """POST .../{id}/cancel of a background request still in its queue: it leaves the queue (nothing went
        downstream) and is retained as cancelled."""
        request_id = request.path_params["request_id"]
        ticket = self.dispatcher.waiting_ticket(request_id)
        if ticket is None:
            return await self.cancel(request)
        ticket.leave()
        state = await self.dispatcher.opened(request_id, self.name, timeout_s=5.0)
        if state is None:
            return await self.cancel(request)
        return JSONResponse(completion_body(state, self.settings.reasoning_field), headers={"X-Request-Id": request_id})

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
