"""What every API surface needs around a request: its body, the client-gone watch, resume points, the image cap."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable

from starlette.requests import Request
from starlette.types import Receive

from ..errors import ApiError, BodyTooLarge, Cancelled, InvalidRequest, UpstreamError
from ..state import Status, StreamState


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it passes ``limit`` bytes (declared or read)."""
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


async def unless_disconnected(receive: Receive, waiting: Awaitable[None]) -> bool:
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


def end_error(state: StreamState) -> ApiError:
    """The error that ended a failed or cancelled completion."""
    if state.status is Status.CANCELLED:
        return Cancelled("the completion was cancelled")
    return state.error or UpstreamError("the completion failed")


def sequence_number(raw: str | None, param: str = "starting_after") -> int | None:
    """A resume point (``Last-Event-ID`` or ``starting_after``): None for "from the start" (absent or -1)."""
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"'{raw}' is not a sequence number", param=param) from None
    if value < -1:
        raise InvalidRequest("sequence numbers start at 0", param=param)
    return None if value == -1 else value


def check_images(fields: Iterable[str], most: int) -> None:
    """At most ``most`` image parts in one request (0: no cap), checked before anything goes downstream.

    ``fields`` names each image part of the request in order, as the surface names fields
    (``messages[2].content[5]``); the 400 names the first one past the cap (docs/architecture.md, "Limits").
    """
    if not most:
        return
    for count, field in enumerate(fields, 1):
        if count > most:
            raise InvalidRequest(f"A request may hold at most {most} images; this is image {count}.", param=field)
