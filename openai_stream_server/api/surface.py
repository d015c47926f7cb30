"""``Surface``, the base of every surface's routes: ids, error answers, by-id lookups and event streams.

What a surface *is* (name, paths, ids, error shape) is its ``SurfaceSpec`` (``api/surfaces.py``);
this class gives the routes what follows from it, once for every surface.
"""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import ClassVar, TypeVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from ..errors import ApiError, NotFound
from ..metrics import Metrics
from ..sse_response import SseResponse
from ..state import StreamState
from .dispatch import Dispatcher
from .surfaces import SurfaceSpec


class Surface:
    """One API surface's routes (docs/architecture.md, "API surfaces").

    A subclass names its ``spec``, lists its ``routes`` and implements ``_create``, raising
    ``ApiError`` for anything that is not a success; ``create`` answers that in the surface's own
    error shape. A route on one completion is decorated with ``by_id``.
    """

    spec: ClassVar[SurfaceSpec]

    def __init__(self, dispatcher: Dispatcher, metrics: Metrics) -> None:
        self.dispatcher = dispatcher
        self.settings = dispatcher.settings
        self.registry = dispatcher.registry
        self.metrics = metrics
        self.name = self.spec.name

    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    def error_response(self, error: ApiError, request_id: str | None = None) -> Response:
        return self.spec.errors.response(error, request_id)

    async def create(self, request: Request) -> Response:
        """The POST that opens a completion: a fresh id, then ``_create``, its errors answered."""
        request_id = self.spec.new_id()
        try:
            return await self._create(request, request_id)
        except ApiError as error:
            return self.error_response(error, request_id)
        finally:
            self.dispatcher.admission.release(request)  # the body it read is no longer held here

    async def _create(self, request: Request, request_id: str) -> Response:
        raise NotImplementedError

    async def lookup(self, request: Request) -> StreamState:
        """The completion the path's ``request_id`` names, if this surface opened it and it is in flight or retained
        here, or in the store (docs/store.md)."""
        spec = self.spec
        raw: str = request.path_params["request_id"]
        request_id = spec.valid_id(raw)
        state = None if request_id is None else await self.registry.find(request_id)
        if state is None or state.surface != spec.name:
            raise NotFound(f"No {spec.noun} with id {raw[:100]!r} in flight or retained.", param=spec.id_param)
        return state

    def sse(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> SseResponse:
        """An event stream with the server's keep-alive pings."""
        return SseResponse(events, headers=headers, ping_interval_s=self.settings.ping_interval_s)


S = TypeVar("S", bound=Surface)


def by_id(
    handler: Callable[[S, Request, StreamState], Awaitable[Response]],
) -> Callable[[S, Request], Awaitable[Response]]:
    """A route on one completion (``{request_id}`` in its path): the handler gets its state; a 404 for an id
    this surface does not hold, and any ``ApiError`` the handler raises, are answered in the surface's shape."""

    @functools.wraps(handler)
    async def route(self: S, request: Request) -> Response:
        try:
            return await handler(self, request, await self.lookup(request))
        except ApiError as error:
            return self.error_response(error, self.spec.valid_id(request.path_params["request_id"]))

    return route
