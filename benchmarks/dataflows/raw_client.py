"""Ceiling node: the raw dora relay with no HTTP in the way.

Stands where the server stands in ``stream.yml`` and drives the same
echo_stream with requests in the server's wire format
(``openai_stream_protocol``): first sequential round trips (request
out, first chunk back: the floor under time to first chunk), then bursts of
concurrent long answers received exactly as the server's reader thread does
(``node.next()`` then ``node.drain()``; ``texts_of`` and the metadata per
chunk), timing its own CPU per chunk (the "dora receive" cost). Writes one
JSON object to ``$RAW_OUT`` and exits, which ends the dataflow.
"""

from __future__ import annotations

import itertools
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from dora import Node

from openai_stream_protocol import REQUEST_OUTPUT, USER_TEXT_PREFIX, is_status, string_array, texts_of


def prompt_for(stream_id: int, tokens: int) -> str:  # the same words as benchmarks.client.prompt_for
    return " ".join(f"s{stream_id}t{i}" for i in range(tokens))


def request(node: Any, stream_id: int, tokens: int) -> str:
    request_id = f"raw-{stream_id}"
    metadata = {"request_id": request_id, "session_id": request_id, "model": "raw", "stream": True, "max_tokens": 0}
    node.send_output(REQUEST_OUTPUT, string_array([USER_TEXT_PREFIX + prompt_for(stream_id, tokens)]), metadata)
    return request_id


def events(node: Any, deadline: float) -> list[dict[str, Any]]:
    """The next batch of events (``next`` then ``drain``), or [] once ``deadline`` passes."""
    timeout = deadline - time.monotonic()
    if timeout <= 0:
        return []
    first = node.next(timeout=timeout)
    if first is None:
        return []
    return [first, *node.drain()]


def percentile_ms(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile of seconds, in milliseconds (as benchmarks.scenarios.percentile)."""
    if not values:
        return None
    ordered = sorted(values)
    return 1000 * ordered[max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))]


def burst(node: Any, concurrency: int, rounds: int, tokens: int, ids: Iterator[int], deadline: float) -> dict[str, Any]:
    """``rounds`` times: ``concurrency`` requests at once, every chunk received and reassembled."""
    chunks = bad = crossed = 0
    cpu = wall = 0.0
    firsts: list[float] = []
    for _ in range(rounds):
        texts: dict[str, list[str]] = {}
        expected: dict[str, str] = {}
        sent: dict[str, float] = {}
        cpu0, wall0 = time.process_time(), time.perf_counter()
        for _ in range(concurrency):
            stream_id = next(ids)
            request_id = request(node, stream_id, tokens)
            sent[request_id] = time.perf_counter()
            texts[request_id] = []
            expected[request_id] = prompt_for(stream_id, tokens)
        open_ids = set(texts)
        while open_ids and time.monotonic() < deadline:
            for ev in events(node, deadline):
                if ev["type"] != "INPUT":
                    continue
                md = ev["metadata"]
                if is_status(md):  # echo_stream's hello and heartbeats: about the node, not a request's chunk
                    continue
                request_id = md.get("request_id")
                got = texts.get(request_id)
                if got is None:
                    crossed += 1
                    continue
                if not got:
                    firsts.append(time.perf_counter() - sent[request_id])
                got.extend(texts_of(ev["value"]))
                chunks += 1
                if md.get("fin"):
                    open_ids.discard(request_id)
        cpu += time.process_time() - cpu0
        wall += time.perf_counter() - wall0
        bad += sum(1 for rid, got in texts.items() if "".join(got) != expected[rid])
    return {
        "concurrency": concurrency,
        "streams": concurrency * rounds,
        "chunks": chunks,
        "wall_s": wall,
        "cpu_s": cpu,
        "chunks_per_s": chunks / wall if wall else None,
        "cpu_us_per_chunk": cpu / chunks * 1e6 if chunks else None,
        "first_chunk_p50_ms": percentile_ms(firsts, 50),
        "first_chunk_p99_ms": percentile_ms(firsts, 99),
        "bad_streams": bad,
        "crossed": crossed,
    }


def main() -> None:
    out = Path(os.environ["RAW_OUT"])
    rtt_n = int(os.environ.get("RAW_RTT_N", "100"))
    tokens = int(os.environ.get("RAW_TOKENS", "256"))
    rtt_tokens = int(os.environ.get("RAW_RTT_TOKENS", str(tokens)))
    levels = [tuple(int(x) for x in level.split(":")) for level in os.environ.get("RAW_LEVELS", "64:4").split(",")]
    budget_s = float(os.environ.get("RAW_BUDGET_S", "120"))
    node = Node()
    deadline = time.monotonic() + budget_s
    ids = itertools.count()

    # Round trips: one request at a time, the time to its first chunk (the rest is read before the next),
    # with the answer length of the server's time-to-first-chunk scenario.
    rtts: list[float] = []
    for i in range(rtt_n + 5):  # the first 5 warm up
        request_id = request(node, next(ids), rtt_tokens)
        started = time.perf_counter()
        first: float | None = None
        finished = False
        while not finished and time.monotonic() < deadline:
            for ev in events(node, deadline):
                if ev["type"] != "INPUT":
                    continue
                md = ev["metadata"]
                if md.get("request_id") != request_id:
                    continue
                if first is None:
                    first = time.perf_counter() - started
                if md.get("fin"):
                    finished = True
        if first is not None and i >= 5:
            rtts.append(first)

    result: dict[str, Any] = {
        "tokens": tokens,
        "rtt_n": len(rtts),
        "rtt_tokens": rtt_tokens,
        "rtt_p50_ms": percentile_ms(rtts, 50),
        "rtt_p99_ms": percentile_ms(rtts, 99),
        "levels": [burst(node, c, r, tokens, ids, deadline) for c, r in levels],
        "timed_out": time.monotonic() >= deadline,
    }
    out.write_text(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except Exception as exc:  # make the failure visible in the dataflow log
        print(f"raw_client failed: {exc!r}", file=sys.stderr)
        raise
