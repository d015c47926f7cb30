"""Figures out of a run: the flat summary, medians over runs, the table, Markdown, the plot, py-spy summaries."""

from __future__ import annotations

import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

Summary = dict[str, Any]


def _div(a: float | None, b: float | None, digits: int = 3) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return round(a / b, digits)


def summarise(run: dict[str, Any], tokens_per_chunk: int = 1) -> Summary:
    """The figures of one run, flat, with every ratio taken against a ceiling measured in the same run."""
    s: Summary = {}
    relay = run.get("relay")
    sse = run.get("sse")
    server = run.get("server", {})
    tpc = tokens_per_chunk
    if relay:
        s["rtt_p50_ms"] = relay["rtt_p50_ms"]
        s["rtt_p99_ms"] = relay["rtt_p99_ms"]
        for level in relay["levels"]:
            c = level["concurrency"]
            s[f"relay{c}_chunks_per_s"] = round(level["chunks_per_s"], 1)
            s[f"relay{c}_cpu_us_per_chunk"] = round(level["cpu_us_per_chunk"], 2)
            s[f"relay{c}_first_chunk_p50_ms"] = level["first_chunk_p50_ms"]
            s[f"relay{c}_bad"] = level["bad_streams"] + level["crossed"]
    if sse:
        for level in sse["levels"]:
            c = level["concurrency"]
            s[f"sse{c}_events_per_s"] = level["events_per_s"]
            s[f"sse{c}_cpu_us_per_event"] = level["server_cpu_us_per_unit"]
            s[f"sse{c}_ttfc_p50_ms"] = level["ttfc_p50_ms"]
        s["sse_rate_per_s"] = sse["rate"]["completions_per_s"]
    lost = duplicated = crossed = failed = 0

    def count(integrity: dict[str, Any]) -> None:
        nonlocal lost, duplicated, crossed, failed
        lost += integrity["lost"]
        duplicated += integrity["duplicated"]
        crossed += integrity["crossed"] + integrity["malformed"]
        failed += integrity["failed"]

    for level in server.get("levels", []):
        c = level["concurrency"]
        chunks_per_s = level["tokens_per_s"] / tpc
        s[f"burst{c}_chunks_per_s"] = round(chunks_per_s, 1)
        s[f"burst{c}_tokens_per_s"] = level["tokens_per_s"]
        s[f"burst{c}_events_per_chunk"] = level["events_per_token"]
        s[f"burst{c}_ttfc_p50_ms"] = level["ttfc_p50_ms"]
        s[f"burst{c}_ttfc_p99_ms"] = level["ttfc_p99_ms"]
        s[f"burst{c}_server_cpu_us_per_chunk"] = level["server_cpu_us_per_unit"]
        s[f"burst{c}_echo_cpu_us_per_chunk"] = level.get("echo_cpu_us_per_unit")
        s[f"burst{c}_client_cpu_us_per_chunk"] = level.get("client_cpu_us_per_unit")
        s[f"burst{c}_vs_relay"] = _div(chunks_per_s, s.get(f"relay{c}_chunks_per_s"))
        s[f"burst{c}_vs_sse"] = _div(chunks_per_s, s.get(f"sse{c}_events_per_s"))
        recv, write = s.get(f"relay{c}_cpu_us_per_chunk"), s.get(f"sse{c}_cpu_us_per_event")
        if recv is not None and write is not None:
            s[f"floor{c}_cpu_us_per_chunk"] = round(recv + write, 2)
            s[f"burst{c}_cpu_vs_floor"] = _div(level["server_cpu_us_per_unit"], recv + write)
        count(level["integrity"])
    ttfc = server.get("ttfc")
    if ttfc:
        s["ttfc_p50_ms"] = ttfc["ttfc_p50_ms"]
        s["ttfc_p99_ms"] = ttfc["ttfc_p99_ms"]
        if s.get("rtt_p50_ms") is not None and ttfc["ttfc_p50_ms"] is not None:
            s["ttfc_above_rtt_ms"] = round(ttfc["ttfc_p50_ms"] - s["rtt_p50_ms"], 3)
        count(ttfc["integrity"])
    rate = server.get("rate")
    if rate:
        s["rate_per_s"] = rate["completions_per_s"]
        s["rate_latency_p50_ms"] = rate["latency_p50_ms"]
        s["rate_latency_p99_ms"] = rate["latency_p99_ms"]
        s["rate_server_cpu_us_per_request"] = rate["server_cpu_us_per_unit"]
        s["rate_vs_sse"] = _div(rate["completions_per_s"], s.get("sse_rate_per_s"))
        count(rate["integrity"])
    if "peak_rss_kib" in server:
        s["burst_peak_rss_mib"] = round(server["peak_rss_kib"] / 1024, 1)
    paced_runs = run.get("paced") or []
    if isinstance(paced_runs, dict):
        paced_runs = [paced_runs]
    for n, paced in enumerate(paced_runs):
        k = paced.get("chunk_tokens", 1)
        p = "paced" if n == 0 else f"paced_k{k}"
        s[f"{p}_chunk_tokens"] = k
        s[f"{p}_offered_tokens_per_s"] = paced["offered_tokens_per_s"]
        s[f"{p}_delivered_tokens_per_s"] = paced["delivered_tokens_per_s"]
        s[f"{p}_delivered_ratio"] = _div(paced["delivered_tokens_per_s"], paced["offered_tokens_per_s"])
        s[f"{p}_stream_tokens_per_s_p50"] = paced.get("stream_tokens_per_s_p50")
        s[f"{p}_added_delay_p50_ms"] = paced["added_delay_p50_ms"]
        s[f"{p}_added_delay_p99_ms"] = paced["added_delay_p99_ms"]
        s[f"{p}_gap_p99_ms"] = paced["gap_p99_ms"]
        s[f"{p}_events_per_chunk"] = _div(paced["events"], -(-paced["tokens"] // k), 4)
        s[f"{p}_server_cpu_us_per_chunk"] = paced["server_cpu_us_per_unit"]
        s[f"{p}_rss_kib_per_stream"] = paced["rss_kib_per_stream"]
        s[f"{p}_peak_rss_mib"] = round(paced["peak_rss_kib"] / 1024, 1)
        s[f"{p}_lost"] = paced["integrity"]["lost"]
        count(paced["integrity"])
    step = run.get("step")
    if step:
        # Step mode (the batch form): keys start with "step", never end in "_chunk_tokens" (that marks per-message paced runs).
        for level in step["levels"]:
            c, p = level["concurrency"], f"stepburst{level['concurrency']}at{level.get('step_ms') or 0:g}ms"
            s[f"{p}_concurrency"] = c
            s[f"{p}_step_ms"] = level.get("step_ms")
            s[f"{p}_chunks_per_s"] = round(level["tokens_per_s"] / tpc, 1)
            s[f"{p}_events_per_chunk"] = level["events_per_token"]
            s[f"{p}_server_cpu_us_per_chunk"] = level["server_cpu_us_per_unit"]
            s[f"{p}_echo_cpu_us_per_chunk"] = level.get("echo_cpu_us_per_unit")
            s[f"{p}_cpu_vs_per_message"] = _div(level["server_cpu_us_per_unit"], s.get(f"burst{c}_server_cpu_us_per_chunk"))
            count(level["integrity"])
        for paced in step["paced"]:
            p = f"steppaced{paced['streams']}"
            s[f"{p}_rate"] = round(paced["offered_tokens_per_s"] / paced["streams"], 2)
            s[f"{p}_step_ms"] = paced.get("step_ms")
            s[f"{p}_offered_tokens_per_s"] = paced["offered_tokens_per_s"]
            s[f"{p}_delivered_tokens_per_s"] = paced["delivered_tokens_per_s"]
            s[f"{p}_delivered_ratio"] = _div(paced["delivered_tokens_per_s"], paced["offered_tokens_per_s"])
            s[f"{p}_stream_tokens_per_s_p50"] = paced.get("stream_tokens_per_s_p50")
            s[f"{p}_added_delay_p50_ms"] = paced["added_delay_p50_ms"]
            s[f"{p}_added_delay_p99_ms"] = paced["added_delay_p99_ms"]
            s[f"{p}_gap_p99_ms"] = paced["gap_p99_ms"]
            s[f"{p}_events_per_chunk"] = _div(paced["events"], paced["tokens"], 4)
            s[f"{p}_server_cpu_us_per_chunk"] = paced["server_cpu_us_per_unit"]
            s[f"{p}_echo_cpu_us_per_chunk"] = paced.get("echo_cpu_us_per_unit")
            s[f"{p}_rss_kib_per_stream"] = paced["rss_kib_per_stream"]
            s[f"{p}_peak_rss_mib"] = round(paced["peak_rss_kib"] / 1024, 1)
            s[f"{p}_lost"] = paced["integrity"]["lost"]
            count(paced["integrity"])
        for ceiling in step.get("ceiling", []):
            p = f"steppaced{ceiling['streams']}"
            s[f"{p}_ceiling_delivered_ratio"] = _div(ceiling["delivered_tokens_per_s"], ceiling["offered_tokens_per_s"])
            s[f"{p}_ceiling_added_delay_p50_ms"] = ceiling["added_delay_p50_ms"]
            s[f"{p}_ceiling_added_delay_p99_ms"] = ceiling["added_delay_p99_ms"]
            s[f"{p}_ceiling_cpu_us_per_event"] = ceiling["server_cpu_us_per_unit"]
            s[f"{p}_ceiling_client_cpu_us_per_event"] = ceiling["client_cpu_us_per_unit"]
            count(ceiling["integrity"])
    idle = run.get("idle")
    if idle:
        s["idle_streams"] = idle["streams"]
        s["idle_rss_kib_per_stream"] = idle["rss_kib_per_stream"]
        count(idle["integrity"])
    seed = run.get("seed")
    if seed:
        r = seed["rate"]
        s["seed_rate_per_s"] = r["completions_per_s"]
        s["seed_requests"] = r["requests"]
        s["seed_crossed_requests"] = r["crossed_requests"]
        s["seed_failed_requests"] = r["integrity"]["failed"]
        s["seed_latency_p99_ms"] = r["latency_p99_ms"]
        s["rate_vs_seed"] = _div(s.get("rate_per_s"), r["completions_per_s"], 1)
    s.update(lost=lost, duplicated=duplicated, crossed=crossed, failed_streams=failed)
    s["integrity_exact"] = lost == duplicated == crossed == failed == 0
    return s


def medians(summaries: list[Summary]) -> Summary:
    """Per key, the median over runs (booleans: all true; counts of faults: the sum)."""
    keys = dict.fromkeys(k for s in summaries for k in s)
    out: Summary = {}
    for key in keys:
        values = [s[key] for s in summaries if s.get(key) is not None]
        if not values:
            out[key] = None
        elif isinstance(values[0], bool):
            out[key] = all(values)
        elif key in ("lost", "duplicated", "crossed", "failed_streams", "seed_crossed_requests") or key.endswith("_lost"):
            out[key] = sum(values)
        else:
            out[key] = round(statistics.median(values), 3)
    return out


def _f(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if isinstance(value, float | int):
        return f"{value:,.{digits}f}"
    return str(value)


def targets(m: Summary) -> list[tuple[str, str, str, bool | None]]:
    """(target, goal, measured, met) from the medians."""

    def met(value: Any, ok: bool) -> bool | None:
        return None if value is None else ok

    rows: list[tuple[str, str, str, bool | None]] = []
    v = m.get("burst64_chunks_per_s")
    rows.append(("burst, 64 streams: chunks/s", ">= 25,000", _f(v), met(v, v is not None and v >= 25000)))
    v = m.get("burst64_cpu_vs_floor")
    floor = m.get("floor64_cpu_us_per_chunk")
    measured = f"{_f(m.get('burst64_server_cpu_us_per_chunk'), 1)} us vs {_f(floor, 1)} us = {_f(v, 2)}x"
    rows.append(
        ("burst, 64: server CPU/chunk vs dora receive + SSE write", "<= 1.3x", measured, met(v, v is not None and v <= 1.3))
    )
    for p in sorted({k.split("_chunk_tokens")[0] for k in m if k.endswith("_chunk_tokens")}):
        k = m.get(f"{p}_chunk_tokens")
        name = f"paced 1,000 x 30 tok/s, {_f(k)} token(s)/message"
        v = m.get(f"{p}_delivered_ratio")
        measured = f"{_f(m.get(f'{p}_delivered_tokens_per_s'))} of {_f(m.get(f'{p}_offered_tokens_per_s'))} ({_f(v, 3)})"
        rows.append((f"{name}: delivered", "all (>= 0.99)", measured, met(v, v is not None and v >= 0.99)))
        v = m.get(f"{p}_added_delay_p99_ms")
        rows.append((f"{name}: added delay p99", "<= 50 ms", f"{_f(v, 1)} ms", met(v, v is not None and v <= 50)))
        v = m.get(f"{p}_lost")
        rows.append((f"{name}: lost chunks", "0", _f(v), met(v, v == 0)))
    rows += step_targets(m, met)
    v = m.get("ttfc_above_rtt_ms")
    measured = f"{_f(m.get('ttfc_p50_ms'), 2)} - {_f(m.get('rtt_p50_ms'), 2)} = {_f(v, 2)} ms (p50)"
    rows.append(("TTFC, 1 client, above raw dora round trip", "<= 1 ms", measured, met(v, v is not None and v <= 1.0)))
    v = m.get("rate_vs_seed")
    measured = f"{_f(m.get('rate_per_s'))}/s vs seed {_f(m.get('seed_rate_per_s'))}/s = {_f(v, 1)}x"
    rows.append(("non-streaming rate, 64 concurrent, vs seed", ">= 10x", measured, met(v, v is not None and v >= 10)))
    v = m.get("crossed")
    rows.append(("cross-talk (ours)", "0", f"{_f(v)} (seed: {_f(m.get('seed_crossed_requests'))} crossed)", met(v, v == 0)))
    v = m.get("idle_rss_kib_per_stream")
    measured = f"{_f(v, 1)} KiB idle ({_f(m.get('paced_rss_kib_per_stream'), 1)} KiB while paced)"
    rows.append(
        (
            f"server RSS per open idle stream at {_f(m.get('idle_streams'))}",
            "<= 64 KiB",
            measured,
            met(v, v is not None and v <= 64),
        )
    )
    v = m.get("integrity_exact")
    faults = f"lost {_f(m.get('lost'))}, dup {_f(m.get('duplicated'))}, crossed {_f(m.get('crossed'))}"
    faults += f", failed {_f(m.get('failed_streams'))}"
    rows.append(("integrity, every stream of every scenario", "exact", faults, v))
    return rows


def _step_paced(m: Summary) -> list[int]:
    return sorted(int(k[len("steppaced") :].split("_")[0]) for k in m if k.startswith("steppaced") and k.endswith("_rate"))


def _step_bursts(m: Summary) -> list[str]:
    """The step-mode burst key prefixes, by concurrency then step time."""
    prefixes = {k.rsplit("_concurrency", 1)[0] for k in m if k.startswith("stepburst") and k.endswith("_concurrency")}
    return sorted(prefixes, key=lambda p: (m.get(f"{p}_concurrency") or 0, m.get(f"{p}_step_ms") or 0))


def step_targets(m: Summary, met: Any) -> list[tuple[str, str, str, bool | None]]:
    """Step mode (the batch form): paced delivery, added delay and memory; burst CPU per chunk against per-message."""
    rows: list[tuple[str, str, str, bool | None]] = []
    for n in _step_paced(m):
        p = f"steppaced{n}"
        name = f"step mode, paced {_f(n)} x {_f(m.get(f'{p}_rate'))} tok/s"
        v = m.get(f"{p}_delivered_ratio")
        measured = f"{_f(m.get(f'{p}_delivered_tokens_per_s'))} of {_f(m.get(f'{p}_offered_tokens_per_s'))} ({_f(v, 3)})"
        rows.append((f"{name}: delivered", "all (>= 0.99)", measured, met(v, v is not None and v >= 0.99)))
        v, goal = m.get(f"{p}_added_delay_p99_ms"), 50 if n <= 1000 else 100
        measured = f"{_f(v, 1)} ms (raw SSE ceiling {_f(m.get(f'{p}_ceiling_added_delay_p99_ms'), 1)} ms)"
        rows.append((f"{name}: added delay p99", f"<= {goal} ms", measured, met(v, v is not None and v <= goal)))
        v = m.get(f"{p}_lost")
        rows.append((f"{name}: lost chunks", "0", _f(v), met(v, v == 0)))
        if n > 1000:
            v = m.get(f"{p}_rss_kib_per_stream")
            rows.append((f"{name}: server RSS per stream", "<= 64 KiB", f"{_f(v, 1)} KiB", met(v, v is not None and v <= 64)))
    for p in _step_bursts(m):
        c, step_ms = m.get(f"{p}_concurrency"), m.get(f"{p}_step_ms")
        v = m.get(f"{p}_cpu_vs_per_message")
        measured = (
            f"{_f(m.get(f'{p}_server_cpu_us_per_chunk'), 1)} us vs {_f(m.get(f'burst{_f(c)}_server_cpu_us_per_chunk'), 1)} us"
            f" = {_f(v, 2)}x"
        )
        name = f"step mode, burst {_f(c)}, a step every {_f(step_ms, 1)} ms: server CPU/chunk vs per-message"
        rows.append((name, "<= 0.5x", measured, met(v, v is not None and v <= 0.5)))
    return rows


def _step_rows(m: Summary) -> list[list[str]]:
    rows = []
    for p in _step_bursts(m):
        c, step_ms = m.get(f"{p}_concurrency"), m.get(f"{p}_step_ms")
        rows += [
            [
                f"step mode, burst {_f(c)}, a step every {_f(step_ms, 1)} ms: chunks/s; SSE events per chunk",
                f"{_f(m.get(f'{p}_chunks_per_s'))}; {_f(m.get(f'{p}_events_per_chunk'), 3)}",
            ],
            [
                f"step mode, burst {_f(c)}, every {_f(step_ms, 1)} ms: server CPU per chunk (x per-message); echo",
                f"{_f(m.get(f'{p}_server_cpu_us_per_chunk'), 1)} us ({_f(m.get(f'{p}_cpu_vs_per_message'), 2)}x);"
                f" echo {_f(m.get(f'{p}_echo_cpu_us_per_chunk'), 1)} us",
            ],
        ]
    for n in _step_paced(m):
        p = f"steppaced{n}"
        name = f"step mode, paced {_f(n)} x {_f(m.get(f'{p}_rate'))} tok/s ({_f(m.get(f'{p}_step_ms'), 1)} ms steps)"
        rows += [
            [
                f"{name}: delivered / offered tokens/s (per stream p50)",
                f"{_f(m.get(f'{p}_delivered_tokens_per_s'))} / {_f(m.get(f'{p}_offered_tokens_per_s'))}"
                f" ({_f(m.get(f'{p}_stream_tokens_per_s_p50'), 1)})",
            ],
            [
                f"{name}: added delay p50 / p99; inter-event gap p99",
                f"{_f(m.get(f'{p}_added_delay_p50_ms'), 2)} / {_f(m.get(f'{p}_added_delay_p99_ms'), 2)} ms;"
                f" {_f(m.get(f'{p}_gap_p99_ms'), 1)} ms",
            ],
            [
                f"{name}: SSE events per chunk; server / echo CPU per chunk",
                f"{_f(m.get(f'{p}_events_per_chunk'), 3)}; {_f(m.get(f'{p}_server_cpu_us_per_chunk'), 1)}"
                f" / {_f(m.get(f'{p}_echo_cpu_us_per_chunk'), 1)} us",
            ],
            [
                f"{name}: server RSS per open stream / peak",
                f"{_f(m.get(f'{p}_rss_kib_per_stream'), 1)} KiB / {_f(m.get(f'{p}_peak_rss_mib'), 1)} MiB",
            ],
            [
                f"{name}: ceiling, raw SSE app on one step clock: added delay p50 / p99; CPU per event",
                f"{_f(m.get(f'{p}_ceiling_added_delay_p50_ms'), 2)} / {_f(m.get(f'{p}_ceiling_added_delay_p99_ms'), 2)} ms;"
                f" {_f(m.get(f'{p}_ceiling_cpu_us_per_event'), 1)} us"
                f" (client {_f(m.get(f'{p}_ceiling_client_cpu_us_per_event'), 1)} us)",
            ],
        ]
    return rows


def _levels(m: Summary) -> list[int]:
    return sorted({int(k[5:].split("_")[0]) for k in m if k.startswith("burst") and k[5:].split("_")[0].isdigit()})


def _burst_rows(m: Summary) -> list[list[str]]:
    rows = []
    for c in _levels(m):
        rows.append(
            [
                str(c),
                _f(m.get(f"burst{c}_chunks_per_s")),
                _f(m.get(f"burst{c}_vs_relay"), 2),
                _f(m.get(f"burst{c}_vs_sse"), 2),
                _f(m.get(f"burst{c}_events_per_chunk"), 2),
                _f(m.get(f"burst{c}_ttfc_p50_ms"), 2),
                _f(m.get(f"burst{c}_ttfc_p99_ms"), 2),
                _f(m.get(f"burst{c}_server_cpu_us_per_chunk"), 1),
                _f(m.get(f"floor{c}_cpu_us_per_chunk"), 1),
                _f(m.get(f"burst{c}_cpu_vs_floor"), 2),
                _f(m.get(f"relay{c}_chunks_per_s")),
                _f(m.get(f"sse{c}_events_per_s")),
            ]
        )
    return rows


BURST_HEAD = [
    "streams",
    "chunks/s",
    "x relay",
    "x SSE",
    "events/chunk",
    "TTFC p50 ms",
    "TTFC p99 ms",
    "server us/chunk",
    "floor us",
    "x floor",
    "relay chunks/s",
    "SSE events/s",
]


def _text_table(head: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    line = "  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(out)


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "| :--- |" + "|".join(" ---: " for _ in head[1:]) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(out)


def _paced_rows(m: Summary) -> list[list[str]]:
    rows = []
    for p in sorted({k.split("_chunk_tokens")[0] for k in m if k.endswith("_chunk_tokens")}):
        k = _f(m.get(f"{p}_chunk_tokens"))
        rows += [
            [
                f"paced, {k} token(s)/message: delivered / offered tokens/s (per stream p50)",
                f"{_f(m.get(f'{p}_delivered_tokens_per_s'))} / {_f(m.get(f'{p}_offered_tokens_per_s'))}"
                f" ({_f(m.get(f'{p}_stream_tokens_per_s_p50'), 1)})",
            ],
            [
                f"paced, {k}: added delay p50 / p99; inter-event gap p99",
                f"{_f(m.get(f'{p}_added_delay_p50_ms'), 2)} / {_f(m.get(f'{p}_added_delay_p99_ms'), 2)} ms;"
                f" {_f(m.get(f'{p}_gap_p99_ms'), 1)} ms",
            ],
            [
                f"paced, {k}: SSE events per message (coalescing); server CPU per message",
                f"{_f(m.get(f'{p}_events_per_chunk'), 3)}; {_f(m.get(f'{p}_server_cpu_us_per_chunk'), 1)} us",
            ],
            [
                f"paced, {k}: server RSS per open stream / peak",
                f"{_f(m.get(f'{p}_rss_kib_per_stream'), 1)} KiB / {_f(m.get(f'{p}_peak_rss_mib'), 1)} MiB",
            ],
        ]
    return rows


def _other_rows(m: Summary) -> list[list[str]]:
    return (
        _paced_rows(m)
        + _step_rows(m)
        + [
            ["raw dora round trip p50 / p99", f"{_f(m.get('rtt_p50_ms'), 2)} / {_f(m.get('rtt_p99_ms'), 2)} ms"],
            ["TTFC, 1 client, short answers, p50 / p99", f"{_f(m.get('ttfc_p50_ms'), 2)} / {_f(m.get('ttfc_p99_ms'), 2)} ms"],
            [
                "non-streaming completions/s (64 concurrent)",
                f"{_f(m.get('rate_per_s'))} (x SSE-only {_f(m.get('rate_vs_sse'), 2)};"
                f" p99 {_f(m.get('rate_latency_p99_ms'), 1)} ms)",
            ],
            ["  server CPU per request", f"{_f(m.get('rate_server_cpu_us_per_request'))} us"],
            [
                "seed dora-openai-server 0.5.0: completions/s",
                f"{_f(m.get('seed_rate_per_s'))} (crossed {_f(m.get('seed_crossed_requests'))},"
                f" failed {_f(m.get('seed_failed_requests'))} of {_f(m.get('seed_requests'))})",
            ],
            ["SSE-only ceiling completions/s", _f(m.get("sse_rate_per_s"))],
            ["server peak RSS (burst)", f"{_f(m.get('burst_peak_rss_mib'), 1)} MiB"],
        ]
    )


def table(document: dict[str, Any]) -> str:
    m = document["median"]
    runs = len(document["summaries"])
    title = f"openai-stream-server benchmark ({document['mode']}, {'median of ' + str(runs) + ' runs' if runs > 1 else '1 run'})"
    parts = [title, "", "Burst: echo_stream at 0 delay", _text_table(BURST_HEAD, _burst_rows(m)), ""]
    parts.append(_text_table(["figure", "value"], _other_rows(m)))
    parts.append("")
    rows = [[t, goal, measured, _f(ok) if ok is not None else "-"] for t, goal, measured, ok in targets(m)]
    parts.append(_text_table(["target", "goal", "measured", "met"], rows))
    return "\n".join(parts)


def markdown(document: dict[str, Any], command: str) -> str:
    m = document["median"]
    machine = document["machine"]
    runs = len(document["summaries"])
    parts = [
        "# Benchmark results",
        "",
        f"`{command}` — {document['mode']} mode, {'median of ' + str(runs) + ' runs' if runs > 1 else 'one run'},"
        f" finished {document['finished_at']}.",
        "",
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), {machine['memory_gib']} GiB, Linux {machine['kernel']},"
        f" Python {machine['python']}, dora-rs {machine['dora_rs']}, uvicorn {machine['uvicorn']}, uvloop {machine['uvloop']}."
        " Server, echo node, dora daemon and the load client share those CPUs.",
        "",
        "## Targets",
        "",
        _md_table(
            ["target", "goal", "measured", "met"],
            [[t, goal, measured, _f(ok) if ok is not None else "-"] for t, goal, measured, ok in targets(m)],
        ),
        "",
        "## Burst (echo_stream at 0 delay)",
        "",
        _md_table(BURST_HEAD, _burst_rows(m)),
        "",
        "## Other figures",
        "",
        _md_table(["figure", "value"], _other_rows(m)),
        "",
        "![throughput and latency against concurrency](../docs/bench.png)",
        "",
    ]
    return "\n".join(parts).replace("\u2014", "-")


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = document["median"]
    levels = _levels(m)

    def series(fmt: str) -> tuple[list[int], list[float]]:
        xs, ys = [], []
        for c in levels:
            v = m.get(fmt.format(c=c))
            if v is not None:
                xs.append(c)
                ys.append(v)
        return xs, ys

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    ax = axes[0]
    for fmt, label, style in (
        ("burst{c}_chunks_per_s", "server (HTTP + dora)", "o-"),
        ("relay{c}_chunks_per_s", "ceiling: raw dora relay", "s--"),
        ("sse{c}_events_per_s", "ceiling: raw SSE write", "^--"),
    ):
        xs, ys = series(fmt)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.axhline(25000, color="grey", linestyle=":", label="target at 64: 25k")
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="chunks/s", title="Burst throughput")
    thousands = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v / 1000:g}k")
    ax.yaxis.set_major_formatter(thousands)
    ax.yaxis.set_minor_formatter(thousands)
    ax.legend(fontsize=8)
    ax = axes[1]
    for fmt, label, style in (
        ("burst{c}_ttfc_p50_ms", "server TTFC p50", "o-"),
        ("burst{c}_ttfc_p99_ms", "server TTFC p99", "o:"),
        ("relay{c}_first_chunk_p50_ms", "raw dora first chunk p50", "s--"),
        ("sse{c}_ttfc_p50_ms", "raw SSE first event p50", "^--"),
    ):
        xs, ys = series(fmt)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set(xscale="log", yscale="log", xlabel="concurrent streams", ylabel="ms", title="Time to first chunk (burst)")
    ax.legend(fontsize=8)
    ax = axes[2]
    for fmt, label, style in (
        ("burst{c}_server_cpu_us_per_chunk", "server CPU per chunk", "o-"),
        ("floor{c}_cpu_us_per_chunk", "dora receive + SSE write", "s--"),
        ("burst{c}_echo_cpu_us_per_chunk", "echo node CPU per chunk", "x:"),
    ):
        xs, ys = series(fmt)
        if xs:
            ax.plot(xs, ys, style, label=label)
    ax.set(xscale="log", xlabel="concurrent streams", ylabel="CPU us per chunk", title="CPU per chunk")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=8)
    paced = (
        f"paced 1,000 x 30 tok/s: {_f(m.get('paced_delivered_tokens_per_s'))} tok/s delivered"
        f" (added delay p99 {_f(m.get('paced_added_delay_p99_ms'), 1)} ms) at 1 token/message,"
        f" {_f(m.get('paced_k4_delivered_tokens_per_s'))} ({_f(m.get('paced_k4_added_delay_p99_ms'), 1)} ms) at 4;"
        f" non-streaming {_f(m.get('rate_per_s'))}/s vs seed {_f(m.get('seed_rate_per_s'))}/s"
    )
    machine = document["machine"]
    fig.suptitle(f"openai-stream-server on {machine['cpus']} CPUs ({document['mode']}, medians)\n{paced}", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^():]*)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    match = _FRAME.match(frame.strip())
    if match is None:
        return frame.strip()
    file = match.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "openai_stream_server/"):
        if marker in file:
            file = file.split(marker, 1)[1] if marker != "openai_stream_server/" else "oss/" + file.split(marker, 1)[1]
    return f"{match.group('func')} ({file})"


def profile_summary(raw: str, top: int = 30) -> str:
    """Self and inclusive shares per function from py-spy's ``--format raw`` (collapsed stacks)."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        threads[frames[0]] += count
        names = [_frame_name(f) for f in frames[1:]] or [frames[0]]
        self_time[names[-1]] += count
        for name in set(names):
            inclusive[name] += count
    if not total:
        return "py-spy: no samples"
    lines = [f"py-spy samples: {total}", "threads:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in threads.most_common()]
    lines.append("self (the frame running when sampled):")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines.append("inclusive (the frame anywhere on the stack):")
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines)
