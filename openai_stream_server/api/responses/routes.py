"""/v1/responses (the OpenAI Responses API): create (JSON, events or background), and by id:
retrieve (JSON or the event stream, resumable with ``starting_after``), cancel, delete.

The response object and events are rendered in ``responses_stream``; the request model is in
``responses_request`` (docs/architecture.md, "Responses API").
"""

from __future__ import annotations

import re
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from openai_stream_protocol import Part

from ..errors import Cancelled, ChatCompletionError, InvalidRequest, NotFound
from ..state import StreamState
from .common import error_response, path_id, read_body, sequence_number
from .dispatch import sampling_metadata
from .responses_request import ResponsesRequest, parse_responses_request
from .responses_stream import Echo, EventRenderer, answer_parts, input_item_list, response_body, response_events
from .surface import Surface

SURFACE = "responses"

_RESPONSE_ID = re.compile(r"resp_[0-9a-f]{1,64}")
"""What ``new_response_id`` makes; a path id (or ``previous_response_id``) must match it."""


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(24)


def echo_of(state: StreamState) -> Echo:
    """The echoed request fields of a response this surface opened."""
    echo = state.context
    return echo if isinstance(echo, Echo) else Echo()


def _flag(raw: str | None, param: str) -> bool:
    if raw is None or raw.lower() in ("", "false", "0"):
        return False
    if raw.lower() in ("true", "1"):
        return True
    raise InvalidRequest(f"'{raw[:20]}' is not a boolean", param=param)


class Responses(Surface):
    """The Responses API routes."""

    name = SURFACE
    new_id = staticmethod(new_response_id)

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
        body = parse_responses_request(await read_body(request, self.settings.max_body_bytes))
        if body.background and not body.store:
            raise InvalidRequest("background responses must be stored: 'store' cannot be false with 'background'", param="store")
        model = self.dispatcher.model(body.model)
        instructions = body.instruction_parts()
        previous = self._previous(body.previous_response_id)
        parts = instructions + previous + body.input_parts()
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
            tools=[tool.echo() for tool in body.tools or ()],
            tool_choice=body.echoed_tool_choice(),
            parallel_tool_calls=True if body.parallel_tool_calls is None else body.parallel_tool_calls,
        )
        state = await self.dispatcher.submit(
            response_id, self.name, model, parts, self._metadata(body, model, response_id), keep_parts=body.store
        )
        state.context = echo
        headers = {"X-Request-Id": response_id}
        renderer = EventRenderer(state, echo)
        if body.background:
            if body.stream:  # no header hold-back: a background response outlives this connection
                return self.sse(response_events(renderer, self.metrics), headers)
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
        except ChatCompletionError:
            if not body.store:
                self.registry.delete(response_id)
            raise

        def on_close() -> None:
            """The POST stream ended or its client left: cancel what is still in flight; forget it unless stored."""
            if body.store:
                self.dispatcher.cancel(response_id)
            else:
                self.registry.delete(response_id)

        events = response_events(renderer, self.metrics, on_close=on_close)
        return self.sse(events, headers)

    def _previous(self, previous_id: str | None) -> list[Part]:
        """The conversation a ``previous_response_id`` continues: its input (less its instructions) and its answer
        (text, and its function calls as a tool-calls part)."""
        if previous_id is None:
            return []
        state = self.registry.get(previous_id) if _RESPONSE_ID.fullmatch(previous_id) else None
        if state is None or state.surface != SURFACE or not echo_of(state).store:
            raise NotFound(f"Previous response with id {previous_id[:100]!r} not found.", param="previous_response_id")
        if not state.done:
            raise InvalidRequest(
                f"Previous response {previous_id!r} is still in progress; continue it once it has ended.",
                param="previous_response_id",
            )
        return state.parts[echo_of(state).instruction_parts :] + answer_parts(state)

    @staticmethod
    def _metadata(body: ResponsesRequest, model: str, response_id: str) -> dict[str, Any]:
        return body.tool_metadata() | sampling_metadata(
            response_id,
            model,
            stream=body.stream or body.background,
            max_tokens=body.max_output_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
        )

    # -- by id ---------------------------------------------------------------

    def _state(self, request: Request) -> StreamState:
        response_id = path_id(request, _RESPONSE_ID)
        state = None if response_id is None else self.registry.get(response_id)
        if state is None or state.surface != SURFACE:
            shown = request.path_params["request_id"][:100]
            raise NotFound(f"No response with id {shown!r} in flight or retained.", param="response_id")
        return state

    async def retrieve(self, request: Request) -> Response:
        """GET: the response so far; with ``?stream=true`` its events, after ``starting_after`` if given, live."""
        try:
            state = self._state(request)
            stream = _flag(request.query_params.get("stream"), "stream")
            after = sequence_number(request.query_params.get("starting_after"))
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _RESPONSE_ID))
        headers = {"X-Request-Id": state.request_id}
        if not stream:
            return JSONResponse(response_body(state, echo_of(state)), headers=headers)
        events = response_events(EventRenderer(state, echo_of(state)), self.metrics, after=after)
        return self.sse(events, headers)

    async def cancel(self, request: Request) -> Response:
        """POST .../cancel: cancel downstream if still in flight (harmless once ended); answers the response."""
        try:
            state = self._state(request)
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _RESPONSE_ID))
        self.dispatcher.cancel(state.request_id)
        return JSONResponse(response_body(state, echo_of(state)), headers={"X-Request-Id": state.request_id})

    async def delete(self, request: Request) -> Response:
        """DELETE: cancel if in flight, then forget it (a later GET or ``previous_response_id`` gets 404)."""
        try:
            state = self._state(request)
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _RESPONSE_ID))
        self.registry.delete(state.request_id)
        return JSONResponse(
            {"id": state.request_id, "object": "response.deleted", "deleted": True}, headers={"X-Request-Id": state.request_id}
        )

    async def input_items(self, request: Request) -> Response:
        """GET .../input_items: this request's own input as items (not its instructions, not what
        ``previous_response_id`` carried over), paged as OpenAI pages them (``order``, ``limit``, ``after``)."""
        try:
            state = self._state(request)
            order = request.query_params.get("order", "desc")
            if order not in ("asc", "desc"):
                raise InvalidRequest(f"'{order[:20]}' is not 'asc' or 'desc'", param="order")
            limit = _limit(request.query_params.get("limit"))
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _RESPONSE_ID))
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
