"""A model node that echoes like echo_stream but shuffles, duplicates, delays and drops its chunks.

Every chunk of a request is sent at once-generated random delays, so they
arrive in a random order (the finish marker too); some are sent twice; a
stray chunk for an id no request has is mixed in. Each request's chaos comes
from ``random.Random(f"{CHAOS_SEED}:{prompt}")``: the same prompt gets the same
chaos whatever order concurrent requests arrive in.

Environment:
  CHAOS_SEED         (7)     the fixed seed
  CHAOS_MAX_DELAY_S  (0.05)  each copy of a chunk is held a random time up to this
  CHAOS_DUPLICATE_P  (0.3)   probability that a chunk is sent twice
  CHAOS_STRAY_P      (0.2)   probability that a request also gets a chunk for an unknown id
  CHAOS_DROP_SEQ     (-1)    when >= 0, this seq of every request is never sent (the finish
                             marker is never dropped, so the server sees a gap it cannot fill)
  CANCEL_LOG                 file that receives the id of every cancel (see _common.py)
"""

from __future__ import annotations

import heapq
import itertools
import random
import time

from _common import CANCEL_OUTPUT, REQUEST_OUTPUT, CancelLog, env_float, env_int, request_of, send_chunk, setup
from dora import Node

MAX_EVENTS = 10_000_000  # bound the loop; a test dataflow never comes near


def main() -> None:
    log = setup("chaos")
    seed = env_int("CHAOS_SEED", 7)
    max_delay = env_float("CHAOS_MAX_DELAY_S", 0.05)
    duplicate_p = env_float("CHAOS_DUPLICATE_P", 0.3)
    stray_p = env_float("CHAOS_STRAY_P", 0.2)
    drop_seq = env_int("CHAOS_DROP_SEQ", -1)
    node, cancels = Node(), CancelLog()
    order = itertools.count()
    # (due, tie-breaker, request id, seq, text, fin)
    heap: list[tuple[float, int, str, int, str, bool]] = []
    cancelled: set[str] = set()
    sent = dropped = duplicated = 0

    def plan(request_id: str, tokens: list[str]) -> None:
        nonlocal dropped, duplicated
        rng = random.Random(f"{seed}:{''.join(tokens)}")
        pieces = [(seq, text, False) for seq, text in enumerate(tokens)] + [(len(tokens), "", True)]
        now = time.monotonic()
        for seq, text, fin in pieces:
            if seq == drop_seq and not fin:
                dropped += 1
                continue
            copies = 2 if rng.random() < duplicate_p else 1
            duplicated += copies - 1
            for _ in range(copies):
                heapq.heappush(heap, (now + rng.uniform(0, max_delay), next(order), request_id, seq, text, fin))
        if rng.random() < stray_p:
            heapq.heappush(heap, (now + rng.uniform(0, max_delay), next(order), request_id + "-stray", 0, "stray", False))

    for _ in range(MAX_EVENTS):
        now = time.monotonic()
        while heap and heap[0][0] <= now:
            _, _, request_id, seq, text, fin = heapq.heappop(heap)
            if request_id not in cancelled:
                send_chunk(node, request_id, seq, text, fin=fin)
                sent += 1
        event = node.next() if not heap else node.next(timeout=max(heap[0][0] - time.monotonic(), 0.001))
        if event is None:
            break
        if event["type"] == "STOP":
            break
        if event["type"] != "INPUT":
            continue  # the ERROR event next(timeout=...) returns when it times out
        if event["id"] == REQUEST_OUTPUT:
            new_id, tokens = request_of(event)
            if new_id:
                plan(new_id, tokens)
        elif event["id"] == CANCEL_OUTPUT:
            gone = cancels.handle(event)
            if gone:
                cancelled.add(gone)
    log.info("sent %d chunks, dropped %d on purpose, duplicated %d", sent, dropped, duplicated)


if __name__ == "__main__":
    main()
