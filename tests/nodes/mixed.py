"""A model node that answers in all three chunk forms at once: batch, single chunks, legacy replies.

The first word of the prompt picks how that request is answered; the answer
is the prompt itself (the echo tokens), so a test can check every stream word
by word:

  batch ...   one row per step in the shared batch message (``BatchSender``),
              with every other batch request's row of that step
  single ...  one message per chunk (``ChunkSender``), all at once
  legacy ...  one whole reply without ``seq`` (what dora-hub's dora-echo sends)
  stray ...   as batch, and each step's message also carries a row for an id
              no request has (``<id>-stray``): the server drops it as unknown
  deaf ...    as batch, but after its first row it waits for the server's
              cancel (up to DEAF_WAIT_S), then sends the rest anyway, and a
              ``fin`` row: the server drops them as late

Environment:
  MIXED_STEP_S (0.01)  time between batch steps
  DEAF_WAIT_S  (10)    how long a deaf request waits for its cancel
"""

from __future__ import annotations

import time
from typing import Any

from _common import CANCEL_OUTPUT, CHUNKS_OUTPUT, REQUEST_OUTPUT, CancelLog, env_float, request_of, setup, string_array
from dora import Node

from openai_stream_protocol import BatchSender, ChunkSender

MAX_EVENTS = 10_000_000  # bound the loop; a test dataflow never comes near


def main() -> None:
    log = setup("mixed")
    step_s = env_float("MIXED_STEP_S", 0.01)
    deaf_wait_s = env_float("DEAF_WAIT_S", 10.0)
    node, cancels = Node(), CancelLog()
    batch = BatchSender(node, CHUNKS_OUTPUT)
    # request id -> [tokens, next position, mode, waiting-for-cancel deadline or None]
    batched: dict[str, list[Any]] = {}
    next_step = time.monotonic() + step_s

    def on_request(event: dict[str, Any]) -> None:
        request_id, tokens = request_of(event)
        if request_id is None:
            return
        mode = tokens[0].strip() if tokens else "batch"
        metadata = event.get("metadata") or {}
        if mode == "single":
            sender = ChunkSender(node, metadata, output=CHUNKS_OUTPUT)
            for token in tokens:
                sender.send(token)
            sender.finish("stop")
        elif mode == "legacy":
            node.send_output(CHUNKS_OUTPUT, string_array(["".join(tokens)]), {"request_id": request_id})
        else:
            batch.open(metadata)
            batched[request_id] = [tokens, 0, mode, None]

    def on_cancel(request_id: str | None) -> None:
        entry = batched.get(request_id or "")
        if entry is None:
            return
        if entry[2] == "deaf":
            entry[3] = None  # the cancel it waited for: now it sends the rest regardless
            entry[2] = "deaf-cancelled"
        else:
            del batched[request_id or ""]
            batch.discard(request_id or "")

    def step() -> None:
        now = time.monotonic()
        for request_id, entry in list(batched.items()):
            tokens, pos, mode, waiting = entry
            if waiting is not None:
                if now < waiting:
                    continue
                entry[3] = None
            if pos < len(tokens):
                batch.send(request_id, tokens[pos])
                entry[1] = pos + 1
                if mode == "deaf" and pos == 0:
                    entry[3] = now + deaf_wait_s
            else:
                batch.finish(request_id, "stop", completion_tokens=len(tokens))
                del batched[request_id]
            if mode == "stray":
                stray = request_id + "-stray"
                batch.open({"request_id": stray})
                batch.finish(stray, "stop", "stray")
        rows = batch.emit()
        if rows:
            log.debug("step: %d rows", rows)

    for _ in range(MAX_EVENTS):
        timeout = max(0.001, next_step - time.monotonic())
        first = node.next(timeout=timeout) if batched else node.next()
        events = [first]
        if first is not None and first.get("type") == "INPUT":
            events.extend(node.drain())
        stop = first is None
        for event in events:
            if event is None:
                continue
            if event["type"] == "STOP":
                stop = True
            elif event["type"] == "INPUT" and event["id"] in (REQUEST_OUTPUT, "v1_chat_completions"):
                was_idle = not batched
                on_request(event)
                if was_idle:
                    next_step = time.monotonic() + step_s
            elif event["type"] == "INPUT" and event["id"] == CANCEL_OUTPUT:
                on_cancel(cancels.handle(event))
        if stop:
            break
        if batched and time.monotonic() >= next_step:
            step()
            next_step += step_s
            if next_step < time.monotonic():
                next_step = time.monotonic() + step_s
    log.info("done")


if __name__ == "__main__":
    main()
