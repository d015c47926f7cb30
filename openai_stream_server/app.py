"""The app factory: the routes of every API surface, the middleware stack, startup and shutdown.

docs/architecture.md, "Architecture": the HTTP layer is this file, ``middleware`` and one package
per API surface in ``api/`` (listed in ``api/surfaces.py``); the stream state (``state``,
``registry``) and the dora bridge (``bridge``, ``replicas``) know nothing of HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import cast

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from .api.chat.routes import ChatCompletions
from .api.completions.routes import Completions
from .api.dispatch import Dispatcher
from .api.messages.routes import Messages
from .api.responses.routes import Responses
from .api.surface import Surface
from .api.surfaces import OPENAI_ERRORS, error_shape
from .backend import Backend, DownstreamRequest
from .errors import ApiError, BackendUnavailable, MethodNotAllowed, NotFound
from .frontdoor import ServerIdentity
from .gateway.keys import KeyRing
from .gateway.models import ModelCatalog
from .metrics import Metrics
from .middleware import RawSendApp, middleware_stack
from .registry import StreamRegistry
from .resend import ResendBackend, Resender
from .settings import Settings
from .state import StreamState
from .store.config import open_store
from .store.keeper import RecordKeeper

logger = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, a method the route does not take), in the path's error shape."""
    assert isinstance(exc, HTTPException)
    detail = str(exc.detail)
    if exc.status_code == 404:
        return error_shape(request.url.path).response(NotFound(detail), None)
    if exc.status_code == 405:
        error = MethodNotAllowed(detail, allow=(exc.headers or {}).get("Allow", ""))
        return error_shape(request.url.path).response(error, None)
    body = {"error": {"message": detail, "type": "invalid_request_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)


def _store_keeper(settings: Settings, metrics: Metrics) -> RecordKeeper | None:
    """The store ``--store`` names, with its counters on /metrics; None for ``memory`` (docs/store.md)."""
    store = open_store(settings)
    if not store.persistent:
        return None
    stats = store.stats
    for name, documentation, read in (
        ("oss_store_records_written", "Records the store wrote (opened and final)", lambda: stats.records_written),
        ("oss_store_write_errors", "Store flushes that failed (disk full, locked, Redis lost)", lambda: stats.write_errors),
        ("oss_store_dropped", "Records never stored: larger than the cap, or queued past the limit", lambda: stats.dropped),
        ("oss_store_evicted", "Records deleted early to stay under --store-max-bytes", lambda: stats.evicted),
        ("oss_store_expired", "Records deleted after their TTL", lambda: stats.expired),
        ("oss_store_log_batches", "Live-log batches appended to the shared store", lambda: stats.log_batches),
    ):
        metrics.count_from(name, documentation, read)
    return RecordKeeper(store)


def _service_routes(
    settings: Settings, backend: Backend, registry: StreamRegistry, metrics: Metrics, resender: Resender, catalog: ModelCatalog
) -> list[BaseRoute]:
    """The demo page, /health, /metrics and /v1/models."""
    started_at = time.time()

    async def list_models(request: Request) -> Response:
        # what is live now: the replicas' model groups and their counts (docs/team.md, "Models by name")
        return JSONResponse({"object": "list", "data": catalog.cards(int(started_at))})

    async def get_model(request: Request) -> Response:
        name = request.path_params["model"]
        try:
            served = catalog.resolve(name)
        except ApiError as error:
            return OPENAI_ERRORS.response(error, None)
        cards = {card["id"]: card for card in catalog.cards(int(started_at))}
        card = cards.get(name) or {**cards.get(served, {}), "id": name, "object": "model", "created": int(started_at)}
        return JSONResponse({"owned_by": "dora", **card})

    async def health(request: Request) -> Response:
        status = backend.health()
        ok = bool(status.get("connected"))
        store = registry.keeper.health() if registry.keeper is not None else {"backend": "memory", "ok": True}
        losing = resender.losing  # chunks lost on the way in the last minute (docs/architecture.md, "Resend")
        body = {
            # A store problem degrades but does not stop the server: it still serves from memory (docs/store.md,
            # "Failures"), so it stays 200; only a lost dora side is a 503. Lost chunks degrade it the same way.
            "status": "ok" if ok and store["ok"] and not losing else "degraded",
            "active_streams": len(registry.active),
            "held_bytes": registry.held_bytes,
            "store": store,
            "server": request.app.state.identity.as_dict(),  # which process answered, of several on one port
            "chunk_loss": resender.health(),
            "models": catalog.health(),  # each model group's replicas, and how many are live
            "queues": request.app.state.dispatcher.queues.health(),  # each group's admission queue (docs/team.md)
            **status,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    async def metrics_route(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    async def index(request: Request) -> Response:
        return FileResponse(STATIC_DIR / "index.html")

    return [
        Route("/", index),
        Route("/health", health),
        Route("/metrics", metrics_route),
        Route("/v1/models", list_models),
        Route("/v1/models/{model:path}", get_model),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),  # the demo page's app.js and style.css
    ]


def create_app(settings: Settings, backend: Backend, identity: ServerIdentity | None = None) -> Starlette:
    """The ASGI app. The backend is started in the lifespan; the registry lives on ``app.state``.

    ``identity``: which server process this is, named by /health and /metrics (docs/architecture.md, "Several server
    processes"); main passes its dora node id.
    """
    metrics = Metrics()
    identity = identity or ServerIdentity.here()
    identity.export(metrics)
    keeper = _store_keeper(settings, metrics)
    registry = StreamRegistry(
        settings,
        metrics,
        on_cancel=backend.cancel,
        on_release=backend.release,
        keeper=keeper,
        on_failed=backend.replica_failed,
        can_retry=backend.can_retry,
    )
    if keeper is not None:
        keeper.attach(registry.cancel, registry.delete)  # what another server process asks of this one
    metrics.count_from(
        "oss_malformed_chunks",
        "Chunks the backend could not read (a bad seq or metadata), dropped",
        lambda: backend.malformed_chunks,
    )
    metrics.replicas_from(backend.replica_stats)
    # Lost chunks asked for again from the replica that sent them (docs/architecture.md, "Resend"): a backend
    # without ``ask_resend`` (a test fake) only has its holes reported.
    asks = backend if hasattr(backend, "ask_resend") else None
    resender = Resender(registry, cast("ResendBackend | None", asks), metrics, gap_timeout_s=settings.gap_timeout_s)
    if hasattr(backend, "on_resend_missed"):
        backend.on_resend_missed = resender.missed
    dispatcher = Dispatcher(settings, backend, registry)
    surfaces: list[Surface] = [
        ChatCompletions(dispatcher, metrics),
        Completions(dispatcher, metrics),
        Responses(dispatcher, metrics),
        Messages(dispatcher, metrics),
    ]
    resending: set[asyncio.Task[None]] = set()

    def resend(state: StreamState, request: DownstreamRequest) -> None:
        task = asyncio.ensure_future(dispatcher.resend(state, request))
        resending.add(task)
        task.add_done_callback(resending.discard)

    registry.on_resend = resend

    def on_orphaned(wire_ids: list[str], error: ApiError, replica_id: str) -> None:
        """A replica died: what it held goes on elsewhere, continued or re-sent, or ends (docs/architecture.md, "Failover")."""
        registry.orphaned(wire_ids, error, replica_id)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        def on_stop() -> None:
            registry.fail_all(_shutdown_error())
            app.state.stopped.set()

        app.state.stopped = asyncio.Event()
        if keeper is not None:
            await keeper.start()
        await backend.start(registry.deliver, on_stop, registry.fail_all, on_orphaned)
        sweeper = asyncio.create_task(_sweep(registry, settings.sweep_interval_s, resender))
        try:
            yield
        finally:
            # Shutdown: every completion still in flight ends with an error event (or 503), then the bridge closes.
            sweeper.cancel()
            dispatcher.close()  # background requests still queued
            registry.fail_all(_shutdown_error())
            await backend.aclose()
            if keeper is not None:
                await keeper.aclose()  # flushes every record written above (docs/store.md, "What is written when")

    keys = KeyRing(settings.api_keys_file) if settings.api_keys_file else None  # a bad file stops the server here
    routes = _service_routes(settings, backend, registry, metrics, resender, dispatcher.catalog)
    for surface in surfaces:
        routes += surface.routes()
    app = RawSendApp(
        routes=routes,
        middleware=middleware_stack(settings, metrics, keys),
        lifespan=lifespan,
        exception_handlers={HTTPException: _http_error},
    )
    app.state.registry = registry
    app.state.metrics = metrics
    app.state.identity = identity
    app.state.resender = resender
    app.state.settings = settings
    app.state.dispatcher = dispatcher
    app.state.keys = keys  # main reads it again on SIGHUP
    return app


def _shutdown_error() -> ApiError:
    return BackendUnavailable("the server is shutting down")


async def _sweep(registry: StreamRegistry, interval_s: float, resender: Resender | None = None) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            registry.sweep()
            if resender is not None:
                resender.sweep()
        except Exception:
            logger.exception("sweep failed")
