"""Ceiling: the raw SSE write path, no dora.

A pure ASGI app on the server's own stack (uvicorn with uvloop + httptools)
that answers ``POST /v1/chat/completions`` the way the server does, but from
memory: the last user message split into the same tokens echo_stream sends,
one preformatted event per token (``openai_stream_server.api.chat.render.ChunkEncoder``,
one ``send`` each, as sse-starlette does), then the finish chunk and
``[DONE]``; ``stream: false`` gets the gathered ``chat.completion`` JSON.
What the real server spends beyond this is the dora side and the plumbing.

With ``--step-ms N`` it paces like echo_stream's step mode instead: one clock
for all streams, and every N ms each open stream gets its next token, stamped
(``x_sent_at``) with the step's time. That is the floor under the step-mode
paced figures (added delay, CPU per event): the HTTP side alone, woken once per
step for every stream, as the server is by one batch message.

Run: ``python -m benchmarks.sse_ceiling --port 8123 [--step-ms 33.3]``.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import time
from typing import Any

import orjson
import uvicorn

from openai_stream_protocol import split_tokens
from openai_stream_server.api.chat.render import ChunkEncoder
from openai_stream_server.sse import DONE

Scope = dict[str, Any]

STEP_S = 0.0
"""``--step-ms`` / 1000; 0: no pacing, every token at once."""


class StepClock:
    """One clock for every stream: ``await wait()`` returns the ``time.time()`` of the next step."""

    def __init__(self) -> None:
        self._next: asyncio.Future[float] | None = None
        self._task: asyncio.Task[None] | None = None

    async def wait(self, step_s: float) -> float:
        if self._task is None:
            self._task = asyncio.ensure_future(self._run(step_s))
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        return await asyncio.shield(self._next)

    async def _run(self, step_s: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:  # bounded by the process: the harness stops it
            due += step_s
            await asyncio.sleep(max(0.0, due - loop.time()))
            due = max(due, loop.time() - step_s)  # behind schedule: catch up at most one step
            waiting, self._next = self._next, None
            if waiting is not None and not waiting.done():
                waiting.set_result(time.time())


CLOCK = StepClock()


async def _body(receive: Any) -> bytes:
    body = b""
    for _ in range(100_000):  # bounded: a request body arrives in a few parts
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    return body


async def app(scope: Scope, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    if scope["method"] != "POST":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
        await send({"type": "http.response.body", "body": b"ok"})
        return
    request = orjson.loads(await _body(receive))
    text = request["messages"][-1]["content"]
    request_id = "chatcmpl-" + secrets.token_hex(12)
    model = request.get("model") or "ceiling"
    created = int(time.time())
    tokens = split_tokens(text)
    if not request.get("stream"):
        body = orjson.dumps(
            {
                "id": request_id,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": len(tokens), "completion_tokens": len(tokens), "total_tokens": 2 * len(tokens)},
            }
        )
        headers = [(b"content-type", b"application/json"), (b"x-request-id", request_id.encode())]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        return
    encoder = ChunkEncoder(request_id, model, created, relay_sent_at=bool(STEP_S))
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": encoder.role(), "more_body": True})
    for seq, token in enumerate(tokens):
        sent_at = await CLOCK.wait(STEP_S) if STEP_S else None
        await send({"type": "http.response.body", "body": encoder.content(token, seq, sent_at), "more_body": True})
    await send({"type": "http.response.body", "body": encoder.finish("stop", len(tokens)), "more_body": True})
    await send({"type": "http.response.body", "body": DONE, "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--step-ms", type=float, default=0.0, help="pace every stream by one step clock (see above)")
    args = parser.parse_args()
    global STEP_S
    STEP_S = args.step_ms / 1000
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
