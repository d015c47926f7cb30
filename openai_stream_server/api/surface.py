"""``Surface``, the base of the API surfaces: what each holds, and how ``create`` turns an error into a response."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import ClassVar

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from ..errors import ChatCompletionError
from ..metrics import Metrics
from ..sse_response import SseResponse
from . import common
from .dispatch import Dispatcher


class Surface:
    """One API surface (docs/architecture.md, "API surfaces").

    A subclass names itself (``name``: the metrics label), makes its ids (``new_id``), lists its
    ``routes`` and implements ``_create``, raising ``ChatCompletionError`` for anything that is not
    a success; ``create`` renders that in the surface's own error shape (``error_response``).
    """

    name: ClassVar[str]

    def __init__(self, dispatcher: Dispatcher, metrics: Metrics) -> None:
        self.dispatcher = dispatcher
        self.settings = dispatcher.settings
        self.registry = dispatcher.registry
        self.metrics = metrics

    @staticmethod
    def new_id() -> str:
        raise NotImplementedError

    def routes(self) -> list[BaseRoute]:
        raise NotImplementedError

    @staticmethod
    def error_response(error: ChatCompletionError, request_id: str | None = None) -> Response:
        """An OpenAI error object; a surface with another error shape overrides it."""
        return common.error_response(error, request_id)

    async def create(self, request: Request) -> Response:
        """The POST that opens a completion: a fresh id, then ``_create``, its errors rendered."""
        request_id = self.new_id()
        try:
            return await self._create(request, request_id)
        except ChatCompletionError as error:
            return self.error_response(error, request_id)

    async def _create(self, request: Request, request_id: str) -> Response:
        raise NotImplementedError

    def sse(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> SseResponse:
        """An event stream with the server's keep-alive pings."""
        return SseResponse(events, headers=headers, ping_interval_s=self.settings.ping_interval_s)
