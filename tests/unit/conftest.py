from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from openai_stream_server.app import create_app
from openai_stream_server.settings import Settings
from tests.fakes import FakeBackend

ClientFactory = Callable[..., "asynccontextmanager[tuple[httpx.AsyncClient, FakeBackend]]"]


@asynccontextmanager
async def make_client(
    settings: Settings | None = None, backend: FakeBackend | None = None
) -> AsyncIterator[tuple[httpx.AsyncClient, FakeBackend]]:
    """The app over ``httpx.ASGITransport`` with its lifespan running (the transport does not run it)."""
    backend = backend or FakeBackend()
    app = create_app(settings or Settings(sweep_interval_s=0.02), backend)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        # localhost: the server answers only to the hosts it knows (openai_stream_server/guard.py)
        async with httpx.AsyncClient(transport=transport, base_url="http://localhost", timeout=10) as client:
            client.app = app  # type: ignore[attr-defined]
            yield client, backend


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with make_client() as (c, _):
        yield c


@pytest.fixture
def client_factory():  # type: ignore[no-untyped-def]
    return make_client
