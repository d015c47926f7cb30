"""/v1/completions, the legacy text completion API: one prompt in, ``text_completion`` JSON or SSE out.

The prompt goes downstream as one user text part, so every node that answers chat answers this too
(docs/architecture.md, "HTTP API", "/v1/completions"). The stream is chat's (``chat.render.ChunkRenderer``)
with another encoder. There is no background mode and no reattach: those are chat extensions.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...state import StreamState
from ..chat.render import ChunkRenderer
from ..chat.request import include_usage
from ..dispatch import queued_comment, sampling_metadata
from ..follow import follow
from ..surface import Surface
from ..surfaces import COMPLETIONS
from .render import TextCompletionEncoder, completion_body
from .request import CompletionRequest, parse_completion_request


class Completions(Surface):
    """The /v1/completions route."""

    spec = COMPLETIONS

    def routes(self) -> list[Route]:
        return [Route("/v1/completions", self.create, methods=["POST"])]

    async def _create(self, request: Request, request_id: str) -> Response:
        body = await self.dispatcher.admission.body(request, parse_completion_request)
        model = self.dispatcher.model(body.model)
        parts, metadata = body.parts(), self._metadata(body, model, request_id)
        ticket = self.dispatcher.enter(model, body.service_tier)  # its model group's queue (docs/team.md)
        headers = {"X-Request-Id": request_id}
        if ticket.waiting and body.stream:  # it waits with its headers out, and learns its place: ": queued N"
            submit = functools.partial(self.dispatcher.submit, request_id, self.name, model, parts, metadata, ticket=ticket)
            events = self.dispatcher.queued_stream(
                ticket, queued_comment, submit, lambda state: self._events(body, model, state),
                request_id=request_id, model=model, surface=self.name,
            )  # fmt: skip
            return self.sse(events, headers)
        await self.dispatcher.admitted(request, ticket)
        state = await self.dispatcher.submit(request_id, self.name, model, parts, metadata, ticket=ticket)
        if not body.stream:
            await self.dispatcher.gathered(request, state)
            return JSONResponse(completion_body(state), headers=headers)
        await self.dispatcher.first_chunk(request, state)
        return self.sse(self._events(body, model, state), headers)

    def _events(self, body: CompletionRequest, model: str, state: StreamState) -> AsyncIterator[bytes]:
        """A POST's stream of chunks; the client leaving cancels it."""
        request_id = state.request_id
        encoder = TextCompletionEncoder(
            request_id,
            model,
            state.created,
            include_usage=include_usage(body.stream_options),
            relay_sent_at=self.settings.relay_sent_at,
        )
        return follow(ChunkRenderer(state, encoder), self.metrics, on_early_close=lambda: self.dispatcher.cancel(request_id))

    @staticmethod
    def _metadata(body: CompletionRequest, model: str, request_id: str) -> dict[str, Any]:
        return sampling_metadata(
            request_id,
            model,
            stream=body.stream,
            max_tokens=body.max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            stop=body.stop,
            seed=body.seed,
        )
