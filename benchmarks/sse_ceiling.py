"""Ceiling: the raw SSE write path, no dora.

A pure ASGI app on the server's own stack (uvicorn with uvloop + httptools)
that answers ``POST /v1/chat/completions`` the way the server does, but from
memory: the last user message split into the same tokens echo_stream sends,
one preformatted event per token (``openai_stream_server.sse.ChunkEncoder``,
one ``send`` each, as sse-starlette does), then the finish chunk and
``[DONE]``; ``stream: false`` gets the gathered ``chat.completion`` JSON.
What the real server spends beyond this is the dora side and the plumbing.

Run: ``python -m benchmarks.sse_ceiling --port 8123``.
"""

from __future__ import annotations

import argparse
import secrets
import time
from typing import Any

import orjson
import uvicorn

from openai_stream_protocol import split_tokens
from openai_stream_server.sse import DONE, ChunkEncoder

Scope = dict[str, Any]


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
    encoder = ChunkEncoder(request_id, model, created)
    headers = [
        (b"content-type", b"text/event-stream; charset=utf-8"),
        (b"cache-control", b"no-store"),
        (b"x-accel-buffering", b"no"),
        (b"x-request-id", request_id.encode()),
    ]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": encoder.role(), "more_body": True})
    for seq, token in enumerate(tokens):
        await send({"type": "http.response.body", "body": encoder.content(token, seq), "more_body": True})
    await send({"type": "http.response.body", "body": encoder.finish("stop", len(tokens)), "more_body": True})
    await send({"type": "http.response.body", "body": DONE, "more_body": False})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    uvicorn.run(app, host="127.0.0.1", port=args.port, loop="uvloop", http="httptools", log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
