"""/v1/responses (the OpenAI Responses API): create (JSON, events or background), and by id:
retrieve (JSON or the event stream, resumable with ``starting_after``), cancel, delete, input items.

The response object and events are rendered in ``render`` (items in ``items``, numbered by ``walk``);
the request model is in ``request`` (docs/architecture.md, "Responses API").
"""

from __future__ import annotations

import functools
import itertools
import json
from collections.abc import AsyncIterator
from typing import Any, NamedTuple

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part, ReasoningRequest

from ...errors import ApiError, Cancelled, InvalidRequest, NotFound
from ...state import StreamState
from ..common import check_images, sequence_number
from ..dispatch import sampling_metadata
from ..follow import follow
from ..reasoning import reasoning_metadata
from ..surface import Surface, by_id
from ..surfaces import RESPONSES
from .echo import Echo, echo_of
from .items import input_item_list
from .render import ResponseRenderer, queued_event, response_body
from .request import ResponsesRequest, parse_responses_request
from .walk import answer_parts


class _Prepared(NamedTuple):
    """What ``Responses._prepare`` makes of a request body."""

    body: ResponsesRequest
    model: str
    instructions: list[Part]
    input: list[Part]
    image_fields: list[str]
    tools_json: str
    metadata: dict[str, Any]


def _flag(raw: str | None, param: str) -> bool:
    if raw is None or raw.lower() in ("", "false", "0"):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise InvalidRequest(f"'{raw[:20]}' is not a boolean", param=param)


class Responses(Surface):
    """The Responses API routes."""

    spec = RESPONSES

    def routes(self) -> list[Route]:
        return [
            Route("/v1/responses", self.create, methods=["POST"]),
            Route("/v1/responses/{request_id}", self.retrieve, methods=["GET"]),
            Route("/v1/responses/{request_id}", self.delete, methods=["DELETE"]),
            Route("/v1/responses/{request_id}/cancel", self.cancel, methods=["POST"]),
            Route("/v1/responses/{request_id}/input_items", self.input_items, methods=["GET"]),
        ]

    # -- POST /v1/responses -------------------------------------------------

    async def _create(self, request: Request, response_id: str) -> Response:
        prepared = await self.dispatcher.admission.body(request, lambda raw: self._prepare(raw, response_id))
        body, model, instructions = prepared.body, prepared.model, prepared.instructions
        previous = await self._previous(body.previous_response_id)
        # What the conversation carries over goes downstream again: it counts first, as it comes first.
        carried = sum(1 for part in previous if part.kind == "image")
        fields = itertools.chain(itertools.repeat("previous_response_id", carried), prepared.image_fields)
        check_images(fields, self.settings.max_images_per_request)
        parts = instructions + previous + prepared.input
        echo = Echo(
            instructions=body.instructions,
            metadata=dict(body.metadata or {}),
            max_output_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            previous_response_id=body.previous_response_id,
            background=body.background,
            store=body.store,
            instruction_parts=len(instructions),
            input_from=len(instructions) + len(previous),
            tools_json=prepared.tools_json,
            tool_choice=body.echoed_tool_choice(),
            parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
            reasoning_effort=None if body.reasoning is None else body.reasoning.effort,
            reasoning_summary=None if body.reasoning is None else body.reasoning.summary,
        )
        ticket = self.dispatcher.enter(model, body.service_tier)  # its model group's queue (docs/team.md)
        headers = {"X-Request-Id": response_id}
        if ticket.waiting and body.stream and not body.background:
            # It waits with its headers out, and learns its place: response.queued events.
            waiting = StreamState(response_id, model, self.name)
            waiting.service_tier = ticket.tier
            said: list[int] = []

            def notice(position: int) -> bytes:
                said.append(position)
                return queued_event(waiting, echo, position, first=len(said) == 1)

            submit = functools.partial(
                self.dispatcher.submit,
                response_id, self.name, model, parts, prepared.metadata, keep_parts=body.store, context=echo, ticket=ticket,
            )  # fmt: skip
            events = self.dispatcher.queued_stream(
                ticket, notice, submit, lambda state: self._events(state, echo, body.store),
                request_id=response_id, model=model, surface=self.name,
            )  # fmt: skip
            return self.sse(events, headers)
        await self.dispatcher.admitted(request, ticket)
        state = await self.dispatcher.submit(
            response_id, self.name, model, parts, prepared.metadata, keep_parts=body.store, context=echo, ticket=ticket
        )
        if body.background:
            if body.stream:  # no header hold-back: a background response outlives this connection
                return self.sse(follow(ResponseRenderer(state, echo), self.metrics), headers)
            return JSONResponse(response_body(state, echo), headers=headers)
        if not body.stream:
            try:
                await self.dispatcher.gathered(request, state)
            except Cancelled:
                pass  # cancelled by POST .../cancel meanwhile: the object says so
            finally:
                if not body.store:
                    self.registry.delete(response_id)
            return JSONResponse(response_body(state, echo), headers=headers)
        try:
            await self.dispatcher.first_chunk(request, state)
        except ApiError:
            if not body.store:
                self.registry.delete(response_id)
            raise
        return self.sse(self._events(state, echo, body.store), headers)

    def _events(self, state: StreamState, echo: Echo, store: bool) -> AsyncIterator[bytes]:
        """A POST's stream of events; the client leaving cancels it, and one not stored is forgotten at its end."""
        response_id = state.request_id
        renderer = ResponseRenderer(state, echo)
        if store:  # the client left: cancel what is still in flight
            return follow(renderer, self.metrics, on_early_close=lambda: self.dispatcher.cancel(response_id))
        # ended or left: forget it (cancelled first if still in flight)
        return follow(renderer, self.metrics, on_close=lambda: self.registry.delete(response_id))

    async def _previous(self, previous_id: str | None) -> list[Part]:
        """The conversation a ``previous_response_id`` continues: its input (less its instructions) and its answer
        (text, and its function calls as a tool-calls part)."""
        if previous_id is None:
            return []
        state = await self.registry.find(previous_id) if RESPONSES.valid_id(previous_id) else None
        if state is None or state.surface != RESPONSES.name or not echo_of(state).store:
            raise NotFound(f"Previous response with id {previous_id[:100]!r} not found.", param="previous_response_id")
        if not state.done:
            raise InvalidRequest(
                f"Previous response {previous_id!r} is still in progress; continue it once it has ended.",
                param="previous_response_id",
            )
        return state.surface_data.parts[echo_of(state).instruction_parts :] + answer_parts(state)

    def _prepare(self, raw: bytes, response_id: str) -> _Prepared:
        """What the request needs before it opens, from its body alone: it may run off the loop (``admission``)."""
        body = parse_responses_request(raw)
        if body.background and not body.store:
            raise InvalidRequest("background responses must be stored: 'store' cannot be false with 'background'", param="store")
        model = self.dispatcher.model(body.model)
        return _Prepared(
            body,
            model,
            body.instruction_parts(),
            body.input_parts(),
            list(body.image_fields()),
            json.dumps([tool.echo() for tool in body.tools or ()]),
            self._metadata(body, model, response_id),
        )

    @staticmethod
    def _metadata(body: ResponsesRequest, model: str, response_id: str) -> dict[str, Any]:
        wish = None if body.reasoning is None else ReasoningRequest(body.reasoning.effort)
        return {**body.tool_metadata(), **reasoning_metadata(wish)} | sampling_metadata(
            response_id,
            model,
            stream=body.stream or body.background,
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
        )

    # -- by id ---------------------------------------------------------------

    @by_id
    async def retrieve(self, request: Request, state: StreamState) -> Response:
        """GET: the response so far; with ``?stream=true`` its events, after ``starting_after`` if given, live."""
        stream = _flag(request.query_params.get("stream"), "stream")
        after = sequence_number(request.query_params.get("starting_after"))
        headers = {"X-Request-Id": state.request_id}
        if not stream:
            return JSONResponse(response_body(state, echo_of(state)), headers=headers)
        return self.sse(follow(ResponseRenderer(state, echo_of(state), after), self.metrics), headers)

    @by_id
    async def cancel(self, request: Request, state: StreamState) -> Response:
        """POST .../cancel: cancel downstream if still in flight (harmless once ended); answers the response."""
        await self.dispatcher.cancel_anywhere(state.request_id)
        return JSONResponse(response_body(state, echo_of(state)), headers={"X-Request-Id": state.request_id})

    @by_id
    async def delete(self, request: Request, state: StreamState) -> Response:
        """DELETE: cancel if in flight, then forget it (a later GET or ``previous_response_id`` gets 404)."""
        self.registry.delete(state.request_id)
        return JSONResponse(
            {"id": state.request_id, "object": "response.deleted", "deleted": True}, headers={"X-Request-Id": state.request_id}
        )

    @by_id
    async def input_items(self, request: Request, state: StreamState) -> Response:
        """GET .../input_items: this request's own input as items (not its instructions, not what
        ``previous_response_id`` carried over), paged as OpenAI pages them (``order``, ``limit``, ``after``)."""
        order = request.query_params.get("order", "desc")
        if order not in ("asc", "desc"):
            raise InvalidRequest(f"'{order[:20]}' is not 'asc' or 'desc'", param="order")
        limit = _limit(request.query_params.get("limit"))
        items = input_item_list(state, echo_of(state))
        if order == "desc":
            items.reverse()
        after = request.query_params.get("after")
        if after is not None:
            ids = [item["id"] for item in items]
            items = items[ids.index(after) + 1 :] if after in ids else []
        page = items[:limit]
        body = {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
        return JSONResponse(body, headers={"X-Request-Id": state.request_id})


def _limit(raw: str | None) -> int:
    """``limit``: 1 to 100, 20 when absent (OpenAI's list rules)."""
    if raw is None:
        return 20
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= 100:
        raise InvalidRequest(f"'{raw[:20]}' is not a number from 1 to 100", param="limit")
    return int(raw)
