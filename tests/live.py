"""A real uvicorn server in a thread on 127.0.0.1, port 0, for timing and disconnect tests.

``httpx.ASGITransport`` buffers whole bodies (a 0.9 s SSE stream arrives as one
piece when the app finishes) and the app sees ``http.disconnect`` only after the
response is complete, so what depends on the wire runs here. The server has its
own event loop in its own thread; ``call`` runs a coroutine function there,
which is how a test reads the registry without racing the loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import uvicorn
from starlette.applications import Starlette

T = TypeVar("T")


class LiveServer:
    def __init__(self, app: Starlette, *, start_timeout_s: float = 10.0) -> None:
        self.app = app
        config = uvicorn.Config(app, host="127.0.0.1", port=0, loop="asyncio", http="httptools", log_config=None, lifespan="on")
        self.server = uvicorn.Server(config)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, name="live-uvicorn", daemon=True)
        self.start_timeout_s = start_timeout_s
        self.port = 0

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self.server.serve())
        finally:
            # sse-starlette leaves a watcher task per stream; end them rather than warn "destroyed but pending"
            pending = asyncio.all_tasks(self.loop)
            for task in pending:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self.loop.close()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(15)

    def call(self, fn: Callable[[], Awaitable[T]] | Callable[[], T], timeout_s: float = 5.0) -> T:
        """Run ``fn`` on the server's loop and return its result."""
        assert self.loop is not None

        async def run() -> Any:
            result = fn()
            if asyncio.iscoroutine(result):
                result = await result
            return result

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(timeout_s)  # type: ignore[no-any-return]


def metric(text: str, name: str, default: float | None = None) -> float:
    """The value of an unlabelled sample (or the sum over a labelled family) in Prometheus text.

    A labelled family with no sample yet is absent from the text: ``default`` then, else ``KeyError``.
    """
    total, found = 0.0, False
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == name or key.startswith(name + "{"):
            total += float(value)
            found = True
    if not found:
        if default is not None:
            return default
        raise KeyError(name)
    return total


async def wait_metric(client: httpx.AsyncClient, name: str, value: float, timeout_s: float = 5.0) -> float:
    """Poll ``GET /metrics`` (bounded in time) until ``name`` reads ``value``; returns the last reading."""
    deadline = time.monotonic() + timeout_s
    current = float("nan")
    while time.monotonic() < deadline:
        current = metric((await client.get("/metrics")).text, name)
        if current == value:
            return current
        await asyncio.sleep(0.05)
    return current


class Events:
    """The ``data:`` payloads of an open SSE response, read a few at a time."""

    def __init__(self, response: httpx.Response) -> None:
        self._lines = response.aiter_lines()

    async def take(self, count: int) -> list[str]:
        events: list[str] = []
        async for line in self._lines:
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) >= count:
                    break
        return events
