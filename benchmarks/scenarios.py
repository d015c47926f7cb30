"""The load scenarios, each against any server that speaks ``POST /v1/chat/completions``.

Every scenario returns a plain dict (JSON-ready) with its figures and an
``integrity`` block; none of them knows about dora or processes.
"""

from __future__ import annotations

import asyncio
import itertools
import statistics
import time
from collections.abc import Iterator
from typing import Any

import orjson

from .client import Connection, Integrity, Response, prompt_for

PATH = "/v1/chat/completions"


def body(stream_id: int, tokens: int, *, stream: bool) -> dict[str, Any]:
    return {
        "model": "gpt-3.5-turbo",
        "messages": [{"role": "user", "content": prompt_for(stream_id, tokens)}],
        "stream": stream,
    }


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


def _stream_failure(response: Response) -> str | None:
    if response.status != 200:
        return f"HTTP {response.status}: {response.body[:200]!r}"
    if response.error:
        return response.error
    if response.finish_reason != "stop":
        return f"finish_reason {response.finish_reason!r}"
    if not response.done:
        return "no [DONE]"
    return None


async def burst(
    port: int, concurrency: int, tokens: int, streams_each: int, ids: Iterator[int], timeout_s: float
) -> dict[str, Any]:
    """``concurrency`` workers, each streaming ``streams_each`` answers of ``tokens`` tokens back to back."""
    integrity = Integrity()
    ttfc: list[float] = []
    events = delivered = 0

    async def worker() -> None:
        nonlocal events, delivered
        connection = Connection(port)
        try:
            for _ in range(streams_each):
                stream_id = next(ids)
                response = await connection.post(PATH, body(stream_id, tokens, stream=True), stream=True, timeout_s=timeout_s)
                content = response.content
                integrity.add(stream_id, tokens, content, failed=_stream_failure(response))
                events += len(response.texts)
                delivered += len(content.split())
                if response.arrivals:
                    ttfc.append(response.arrivals[0] - response.sent_at)
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "streams": concurrency * streams_each,
        "tokens_per_stream": tokens,
        "wall_s": round(wall, 4),
        "tokens": delivered,
        "events": events,
        "tokens_per_s": round(delivered / wall, 1),
        "events_per_s": round(events / wall, 1),
        "events_per_token": round(events / delivered, 4) if delivered else None,
        "ttfc_p50_ms": ms(percentile(ttfc, 50)),
        "ttfc_p99_ms": ms(percentile(ttfc, 99)),
        "integrity": integrity.as_dict(),
    }


async def paced(
    port: int, streams: int, tokens: int, offered_per_stream: float, ids: Iterator[int], timeout_s: float
) -> dict[str, Any]:
    """``streams`` concurrent streams, all opened at once, while the node paces each one's tokens."""
    integrity = Integrity()
    responses: list[Response] = []

    async def one() -> None:
        connection = Connection(port)
        stream_id = next(ids)
        try:
            response = await connection.post(PATH, body(stream_id, tokens, stream=True), stream=True, timeout_s=timeout_s)
        finally:
            connection.close()
        integrity.add(stream_id, tokens, response.content, failed=_stream_failure(response))
        responses.append(response)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(streams)))
    wall = time.perf_counter() - started

    firsts = [r.arrivals[0] for r in responses if r.arrivals]
    lasts = [r.arrivals[-1] for r in responses if r.arrivals]
    delays: list[float] = []
    gaps: list[float] = []
    arrivals: list[tuple[float, int]] = []
    events = delivered = 0
    for r in responses:
        events += len(r.texts)
        previous: float | None = None
        for at, text, stamp in zip(r.arrivals, r.texts, r.stamps, strict=True):
            n = len(text.split())
            delivered += n
            arrivals.append((at, n))
            if stamp is not None:
                delays.append(at - stamp)
            if previous is not None:
                gaps.append(at - previous)
            previous = at
    # The steady window: nearly every stream has begun (90 %) and nearly none has ended (10 %); the
    # ramp-up of 1,000 connections and the tail are outside it.
    window_start, window_end = (percentile(firsts, 90) or 0.0, percentile(lasts, 10) or 0.0) if firsts else (0.0, 0.0)
    if window_end - window_start < 0.5 and firsts:
        window_start, window_end = min(firsts), max(lasts)
    per_stream = [
        (len(r.content.split()) - 1) / (r.arrivals[-1] - r.arrivals[0])
        for r in responses
        if len(r.arrivals) > 1 and r.arrivals[-1] > r.arrivals[0]
    ]
    in_window = sum(n for at, n in arrivals if window_start <= at <= window_end)
    span = max(window_end - window_start, 1e-9)
    return {
        "streams": streams,
        "tokens_per_stream": tokens,
        "offered_tokens_per_s": round(streams * offered_per_stream, 1),
        "wall_s": round(wall, 4),
        "window_s": round(span, 3),
        "tokens": delivered,
        "events": events,
        "delivered_tokens_per_s": round(in_window / span, 1),
        "stream_tokens_per_s_p50": round(percentile(per_stream, 50) or 0.0, 2),
        "stream_tokens_per_s_p1": round(percentile(per_stream, 1) or 0.0, 2),
        "events_per_token": round(events / delivered, 4) if delivered else None,
        "added_delay_p50_ms": ms(percentile(delays, 50)),
        "added_delay_p99_ms": ms(percentile(delays, 99)),
        "added_delay_max_ms": ms(max(delays) if delays else None),
        "stamped_events": len(delays),
        "gap_p50_ms": ms(percentile(gaps, 50)),
        "gap_p99_ms": ms(percentile(gaps, 99)),
        "integrity": integrity.as_dict(),
    }


async def rate(
    port: int, concurrency: int, tokens: int, duration_s: float, ids: Iterator[int], timeout_s: float
) -> dict[str, Any]:
    """Non-streaming completions for ``duration_s`` from ``concurrency`` keep-alive workers."""
    integrity = Integrity()
    crossed_requests = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + duration_s

    async def worker() -> None:
        nonlocal crossed_requests
        connection = Connection(port)
        try:
            while time.perf_counter() < deadline:
                stream_id = next(ids)
                response = await connection.post(PATH, body(stream_id, tokens, stream=False), stream=False, timeout_s=timeout_s)
                content = ""
                failure = None
                if response.status != 200 or response.error:
                    failure = response.error or f"HTTP {response.status}: {response.body[:200]!r}"
                else:
                    try:
                        content = orjson.loads(response.body)["choices"][0]["message"]["content"]
                    except (ValueError, KeyError, IndexError, TypeError) as exc:
                        failure = f"bad body ({exc!r}): {response.body[:200]!r}"
                before = integrity.crossed
                integrity.add(stream_id, tokens, content if isinstance(content, str) else str(content), failed=failure)
                if integrity.crossed > before:
                    crossed_requests += 1
                if failure is None:
                    latencies.append(time.time() - response.sent_at)
                if response.error:
                    connection.close()
        finally:
            connection.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.perf_counter() - started
    completed = integrity.ok
    return {
        "concurrency": concurrency,
        "tokens_per_request": tokens,
        "wall_s": round(wall, 4),
        "requests": integrity.streams,
        "completed": completed,
        "completions_per_s": round(completed / wall, 1),
        "latency_p50_ms": ms(percentile(latencies, 50)),
        "latency_p99_ms": ms(percentile(latencies, 99)),
        "crossed_requests": crossed_requests,
        "integrity": integrity.as_dict(),
    }


def stream_ids(start: int = 0) -> Iterator[int]:
    return itertools.count(start)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None
