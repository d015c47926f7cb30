"""/v1/chat/completions: create (JSON, SSE or background), and by id: retrieve, reattach, cancel."""

from __future__ import annotations

import re
import secrets
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..errors import ChatCompletionError, NotFound
from ..state import Status, StreamState
from .chat_request import ChatCompletionRequest, parse_chat_request
from .chat_stream import ChunkEncoder, chunk_events
from .common import end_error, error_response, path_id, read_body, sequence_number
from .dispatch import sampling_metadata
from .surface import Surface
from .tools import call_dict, tool_metadata

SURFACE = "chat"

_REQUEST_ID = re.compile(r"chatcmpl-[0-9a-f]{1,64}")
"""What ``new_request_id`` makes; a path id must match it (``common.path_id``)."""


def new_request_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def completion_body(state: StreamState) -> dict[str, Any]:
    """The ``chat.completion`` object gathered so far (``status`` is our extension, for GET by id)."""
    body: dict[str, Any] = {
        "id": state.request_id,
        "object": "chat.completion",
        "created": state.created,
        "model": state.model,
        "system_fingerprint": None,
        "choices": [
            {
                "index": 0,
                "message": _message(state),
                "logprobs": None,
                "finish_reason": state.finish_reason,
            }
        ],
        "usage": state.usage,
        "status": state.status.value,
    }
    if state.status in (Status.FAILED, Status.CANCELLED):
        body["error"] = end_error(state).to_dict()["error"]
    return body


def _message(state: StreamState) -> dict[str, Any]:
    """The assistant message: its text, and its tool calls when it made any (content is then null if empty)."""
    if not state.tool_calls:
        return {"role": "assistant", "content": state.text, "refusal": None}
    text = state.text
    calls = [call_dict(call) for call in state.calls()]
    return {"role": "assistant", "content": text or None, "refusal": None, "tool_calls": calls}


class ChatCompletions(Surface):
    """The chat completion routes."""

    name = SURFACE
    new_id = staticmethod(new_request_id)

    def routes(self) -> list[Route]:
        return [
            Route("/v1/chat/completions", self.create, methods=["POST"]),
            Route("/v1/chat/completions/{request_id}", self.retrieve),
            Route("/v1/chat/completions/{request_id}/stream", self.stream),
            Route("/v1/chat/completions/{request_id}/cancel", self.cancel, methods=["POST"]),
        ]

    # -- POST /v1/chat/completions -----------------------------------------

    async def _create(self, request: Request, request_id: str) -> Response:
        body = parse_chat_request(await read_body(request, self.settings.max_body_bytes))
        model = self.dispatcher.model(body.model)
        state = await self.dispatcher.submit(request_id, self.name, model, body.parts(), self._metadata(body, model, request_id))
        headers = {"X-Request-Id": request_id}
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
            gathered = completion_body(state)
            del gathered["status"]
            return JSONResponse(gathered, headers=headers)
        await self.dispatcher.first_chunk(request, state)
        encoder = ChunkEncoder(
            request_id, model, state.created, include_usage=body.include_usage, relay_sent_at=self.settings.relay_sent_at
        )
        events = chunk_events(state, encoder, self.metrics, on_early_close=lambda: self.dispatcher.cancel(request_id))
        return self.sse(events, headers)

    @staticmethod
    def _metadata(body: ChatCompletionRequest, model: str, request_id: str) -> dict[str, Any]:
        tools = tool_metadata(body.tools, body.tool_choice, body.parallel_tool_calls)
        return tools | sampling_metadata(
            request_id,
            model,
            stream=body.stream or body.background,
            max_tokens=body.token_limit,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop_list if body.stop is not None else None,
            seed=body.seed,
        )

    # -- by id ---------------------------------------------------------------

    def _state(self, request: Request) -> StreamState:
        request_id = path_id(request, _REQUEST_ID)
        state = None if request_id is None else self.registry.get(request_id)
        if state is None:
            shown = request.path_params["request_id"][:100]
            raise NotFound(f"No completion {shown!r} in flight or retained.", param="id")
        return state

    async def stream(self, request: Request) -> Response:
        """GET .../{id}/stream: (re)attach from the start or after ``Last-Event-ID`` / ``starting_after``."""
        try:
            state = self._state(request)
            after = sequence_number(request.headers.get("last-event-id") or request.query_params.get("starting_after"))
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _REQUEST_ID))
        encoder = ChunkEncoder(state.request_id, state.model, state.created, resumable=True)
        events = chunk_events(
            state,
            encoder,
            self.metrics,
            after=after,
            max_events=self.settings.close_stream_after_events,
            retry_ms=self.settings.sse_retry_ms,
        )
        return self.sse(events, {"X-Request-Id": state.request_id})

    async def retrieve(self, request: Request) -> Response:
        try:
            state = self._state(request)
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _REQUEST_ID))
        return JSONResponse(completion_body(state), headers={"X-Request-Id": state.request_id})

    async def cancel(self, request: Request) -> Response:
        try:
            state = self._state(request)
        except ChatCompletionError as error:
            return error_response(error, path_id(request, _REQUEST_ID))
        self.dispatcher.cancel(state.request_id)
        return JSONResponse(completion_body(state), headers={"X-Request-Id": state.request_id})
