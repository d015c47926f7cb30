"""The HTTP layer: routes, validation, JSON and SSE responses (docs/architecture.md, Architecture, room 1)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from openai_stream_protocol import split_tokens

from .backend import Backend, DownstreamRequest
from .errors import (
    BackendUnavailable,
    BodyTooLarge,
    ChatCompletionError,
    InvalidRequest,
    ModelNotFound,
    NotFound,
)
from .guard import ApiKeyMiddleware, RequestGuard
from .metrics import Metrics
from .registry import StreamRegistry
from .schema import ChatCompletionRequest, parse_chat_request
from .settings import Settings
from .sse import ChunkEncoder
from .sse_response import RAW_SEND, SseResponse
from .state import Status, StreamState
from .streams import chunk_events, completion_body, end_error

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


def new_request_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


# What ``new_request_id`` makes. A path id is checked against it before any lookup, header or log
# line: one with a control or non-ASCII character cannot go into ``X-Request-Id`` (that was a 500).
_REQUEST_ID = re.compile(r"chatcmpl-[0-9a-f]{1,64}")


def _path_id(request: Request) -> str | None:
    """The path's completion id if it is one this server could have made, else None."""
    request_id: str = request.path_params["request_id"]
    return request_id if _REQUEST_ID.fullmatch(request_id) else None


class _App(Starlette):
    """Starlette that leaves the server's own ``send`` in the scope, for ``SseResponse``'s body messages.

    Every middleware here wraps ``send`` only to look at the response start; ``SseResponse`` sends the
    start through them and each event past them (~1.5 us per event; see ``sse_response``).
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope[RAW_SEND] = send
        await super().__call__(scope, receive, send)


class _RequestCounter:
    """Counts /v1/chat/completions answers by status; looks only at the response start."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith("/v1/chat/completions"):
            await self.app(scope, receive, send)
            return

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting_send)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    # isascii: "\xb2".isdigit() is true and int() refuses it (a 500 the fuzz found)
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"the request body is {declared} bytes; the limit is {limit}")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise BodyTooLarge(f"the request body exceeds {limit} bytes")
    return bytes(body)


async def _until_disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _unless_disconnected(receive: Receive, waiting: Awaitable[None]) -> bool:
    """Await ``waiting`` unless the client disconnects first; False if it did (``waiting`` is then cancelled).

    Only for before the response starts: the body has been read, so the next message is the disconnect.
    """
    watcher = asyncio.ensure_future(_until_disconnected(receive))
    waiter = asyncio.ensure_future(waiting)
    try:
        await asyncio.wait({watcher, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        waiter.cancel()
    return not (watcher.done() and not watcher.cancelled())


class ChatCompletions:
    """The chat completion routes; holds the registry, the backend and the settings."""

    def __init__(self, settings: Settings, backend: Backend, registry: StreamRegistry, metrics: Metrics) -> None:
        self.settings = settings
        self.backend = backend
        self.registry = registry
        self.metrics = metrics

    # -- POST /v1/chat/completions -----------------------------------------

    async def create(self, request: Request) -> Response:
        request_id = new_request_id()
        try:
            return await self._create(request, request_id)
        except ChatCompletionError as error:
            return error_response(error, request_id)

    async def _create(self, request: Request, request_id: str) -> Response:
        body = parse_chat_request(await _read_body(request, self.settings.max_body_bytes))
        model = self._model(body)
        parts = body.parts()
        # No replica live (one is restarting): wait a little for one rather than fail at once
        # (docs/architecture.md, "Replicas and failover"); returns at once while one is live.
        await self.backend.wait_live(self.settings.model_wait_s)
        state = self.registry.open(request_id, model, prompt_tokens=sum(len(split_tokens(p.content)) for p in parts))
        downstream = DownstreamRequest(request_id, [p.encode() for p in parts], self._metadata(body, model, request_id))
        try:
            self.backend.submit(downstream)
        except ChatCompletionError as error:
            self.registry.fail(state, error)  # never submitted: no cancel goes downstream
            raise
        state.submitted = True
        state.request = downstream
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
            return await self._gathered(request, state, headers)
        # Hold the headers back until the first chunk or an error is known, so that a failure
        # still gets a real HTTP status the SDK can retry on (docs/architecture.md, HTTP API). A client that
        # leaves meanwhile is cancelled at once, not when the grace period ends (issue 3).
        if not await _unless_disconnected(request.receive, state.wait(0, timeout_s=self.settings.header_grace_s)):
            self._cancel(request_id)
            raise end_error(state)
        if state.done and not state.nbytes and state.status is not Status.COMPLETED:
            raise end_error(state)
        encoder = ChunkEncoder(
            request_id, model, state.created, include_usage=body.include_usage, relay_sent_at=self.settings.relay_sent_at
        )
        events = chunk_events(state, encoder, self.metrics, on_early_close=lambda: self._cancel(request_id))
        return self._sse(events, headers)

    def _model(self, body: ChatCompletionRequest) -> str:
        models = self.settings.models
        if body.model is None:
            return self.settings.default_model
        if models and body.model not in models:
            raise ModelNotFound(f"The model '{body.model}' does not exist; this server has {', '.join(models)}.", param="model")
        return body.model

    def _metadata(self, body: ChatCompletionRequest, model: str, request_id: str) -> dict[str, Any]:
        metadata: dict[str, Any] = {
            "request_id": request_id,
            "session_id": request_id,
            "model": model,
            "stream": body.stream or body.background,
            "max_tokens": body.token_limit or 0,
        }
        if body.temperature is not None:
            metadata["temperature"] = float(body.temperature)
        if body.top_p is not None:
            metadata["top_p"] = float(body.top_p)
        if body.stop is not None:
            metadata["stop"] = body.stop_list
        if body.seed is not None:
            metadata["seed"] = body.seed
        return metadata

    async def _gathered(self, request: Request, state: StreamState, headers: dict[str, str]) -> Response:
        """``stream: false``: wait for the end, cancelling if the client goes first."""
        if not state.done and not await _unless_disconnected(request.receive, state.wait_done()):
            self._cancel(state.request_id)
        if state.status is not Status.COMPLETED:
            raise end_error(state)
        body = completion_body(state)
        del body["status"]
        return JSONResponse(body, headers=headers)

    def _sse(self, events: AsyncIterator[bytes], headers: dict[str, str]) -> Response:
        return SseResponse(events, headers=headers, ping_interval_s=self.settings.ping_interval_s)

    def _cancel(self, request_id: str) -> None:
        self.registry.cancel(request_id)

    async def resend(self, state: StreamState, replica_id: str) -> None:
        """Re-send a request whose replica died before its first chunk, to another (or the same, restarted) one."""
        request = self.registry.retry(state, replica_id)
        if request is None:
            return
        await self.backend.wait_live(self.settings.model_wait_s)
        if state.done:  # cancelled or timed out meanwhile
            return
        try:
            self.backend.submit(request)
        except ChatCompletionError as error:
            self.registry.fail(state, error)

    # -- by id ---------------------------------------------------------------

    def _state(self, request: Request) -> StreamState:
        request_id = _path_id(request)
        state = None if request_id is None else self.registry.get(request_id)
        if state is None:
            shown = request.path_params["request_id"][:100]
            raise NotFound(f"No completion {shown!r} in flight or retained.", param="id")
        return state

    async def stream(self, request: Request) -> Response:
        """GET .../{id}/stream: (re)attach from the start or after ``Last-Event-ID`` / ``starting_after``."""
        try:
            state = self._state(request)
            after = _after(request)
        except ChatCompletionError as error:
            return error_response(error, _path_id(request))
        encoder = ChunkEncoder(state.request_id, state.model, state.created, resumable=True)
        events = chunk_events(
            state,
            encoder,
            self.metrics,
            after=after,
            max_events=self.settings.close_stream_after_events,
            retry_ms=self.settings.sse_retry_ms,
        )
        return self._sse(events, {"X-Request-Id": state.request_id})

    async def retrieve(self, request: Request) -> Response:
        try:
            state = self._state(request)
        except ChatCompletionError as error:
            return error_response(error, _path_id(request))
        return JSONResponse(completion_body(state), headers={"X-Request-Id": state.request_id})

    async def cancel(self, request: Request) -> Response:
        try:
            state = self._state(request)
        except ChatCompletionError as error:
            return error_response(error, _path_id(request))
        self._cancel(state.request_id)
        return JSONResponse(completion_body(state), headers={"X-Request-Id": state.request_id})


def _after(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("starting_after")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{raw}' is not a sequence number", param="starting_after") from None
    if value < -1:
        raise InvalidRequest("sequence numbers start at 0", param="starting_after")
    return None if value == -1 else value


def error_response(error: ChatCompletionError, request_id: str | None = None) -> JSONResponse:
    headers = error.headers()
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error = ChatCompletionError(str(exc.detail))
    error.status = exc.status_code  # type: ignore[misc]
    error.error_type = "invalid_request_error"  # type: ignore[misc]
    error.code = "not_found" if exc.status_code == 404 else None  # type: ignore[misc]
    return JSONResponse(error.to_dict(), status_code=exc.status_code, headers=exc.headers)


def create_app(settings: Settings, backend: Backend) -> Starlette:
    """The ASGI app. The backend is started in the lifespan; the registry lives on ``app.state``."""
    metrics = Metrics()
    registry = StreamRegistry(settings, metrics, on_cancel=backend.cancel, on_release=backend.release)
    metrics.count_from(
        "oss_malformed_chunks",
        "Chunks the backend could not read (a bad seq or metadata), dropped",
        lambda: getattr(backend, "malformed_chunks", 0),
    )
    metrics.replicas_from(lambda: getattr(backend, "replica_stats", list)())
    chat = ChatCompletions(settings, backend, registry, metrics)
    started_at = time.time()
    resending: set[asyncio.Task[None]] = set()

    def on_orphaned(wire_ids: list[str], error: ChatCompletionError, replica_id: str) -> None:
        """A replica died: fail what it had streamed, re-send what it had not (docs/architecture.md, "Replicas and failover")."""
        for state in registry.orphaned(wire_ids, error):
            task = asyncio.ensure_future(chat.resend(state, replica_id))
            resending.add(task)
            task.add_done_callback(resending.discard)

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": int(started_at), "owned_by": "dora"}

    async def list_models(request: Request) -> Response:
        names = settings.models or (settings.default_model,)
        return JSONResponse({"object": "list", "data": [model_card(n) for n in names]})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        if settings.models and name not in settings.models:
            return error_response(ModelNotFound(f"The model '{name}' does not exist.", param="model"))
        return JSONResponse(model_card(name))

    async def health(request: Request) -> Response:
        status = backend.health()
        ok = bool(status.get("connected"))
        body = {
            "status": "ok" if ok else "degraded",
            "active_streams": len(registry.active),
            "held_bytes": registry.held_bytes,
            **status,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        def on_stop() -> None:
            registry.fail_all(_shutdown_error())
            app.state.stopped.set()

        app.state.stopped = asyncio.Event()
        await backend.start(registry.deliver, on_stop, registry.fail_all, on_orphaned)
        sweeper = asyncio.create_task(_sweep(registry, settings.sweep_interval_s))
        try:
            yield
        finally:
            sweeper.cancel()
            registry.fail_all(_shutdown_error())
            await backend.aclose()

    middleware = [Middleware(_RequestCounter, metrics=metrics)]
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type", "Last-Event-ID"],
                expose_headers=["X-Request-Id"],
            )
        )
    # Inside CORS, so that an allowed origin's page can read the 415/421/401 it gets.
    middleware.append(
        Middleware(
            RequestGuard,
            bound_host=settings.host,
            allowed_hosts=settings.allowed_hosts,
            cors_origins=settings.cors_origins,
        )
    )
    if settings.api_key:
        middleware.append(Middleware(ApiKeyMiddleware, api_key=settings.api_key, public_metrics=settings.public_metrics))

    routes = [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics_route),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Route("/v1/chat/completions", chat.create, methods=["POST"]),
        Route("/v1/chat/completions/{request_id}", chat.retrieve),
        Route("/v1/chat/completions/{request_id}/stream", chat.stream),
        Route("/v1/chat/completions/{request_id}/cancel", chat.cancel, methods=["POST"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),  # the demo page's app.js and style.css
    ]
    app = _App(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers={HTTPException: _http_error})
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.settings = settings
    return app


def _shutdown_error() -> ChatCompletionError:
    return BackendUnavailable("the server is shutting down")


async def _sweep(registry: StreamRegistry, interval_s: float) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            registry.sweep()
        except Exception:
            logger.exception("sweep failed")
