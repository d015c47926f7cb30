"""What every API surface needs around a request: its body, its errors, the client-gone watch."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import Receive

from ..errors import BodyTooLarge, Cancelled, ChatCompletionError, InvalidRequest, UpstreamError
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


def end_error(state: StreamState) -> ChatCompletionError:
    """The error that ended a failed or cancelled completion."""
    if state.status is Status.CANCELLED:
        return Cancelled("the completion was cancelled")
    return state.error or UpstreamError("the completion failed")


def error_response(error: ChatCompletionError, request_id: str | None = None) -> JSONResponse:
    """An OpenAI error object with the error's status and headers (``X-Request-Id`` when known)."""
    headers = error.headers()
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error.to_dict(), status_code=error.status, headers=headers)


def path_id(request: Request, pattern: re.Pattern[str]) -> str | None:
    """The path's ``request_id`` if it is one this server could have made (``pattern``), else None.

    Checked before any lookup, header or log line: an id with a control or non-ASCII character
    cannot go into ``X-Request-Id`` (that was a 500).
    """
    request_id: str = request.path_params["request_id"]
    return request_id if pattern.fullmatch(request_id) else None


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
