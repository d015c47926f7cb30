"""The nodes of ``benchmarks/fanout.py``: ``replica`` sends chunks for N servers, ``server`` receives its own.

Settings come from ``FANOUT_*`` variables (the dataflow writes them): the form (``single``: one
message per chunk; ``batch``: one struct-array message per step), the layout (``per-server``: an
output per server; ``shared``: one output, every message names its server in its metadata;
``shared-one``: batch form only, one message per step holding every server's rows), the servers,
the rate (chunks/s, or steps/s for batches), the seconds and the rows per server per step.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pyarrow as pa
from dora import Node

from openai_stream_protocol import BatchSender, is_batch, parse_batch, parse_chunk, string_array, texts_of

SERVER_KEY = "server"


def replica() -> None:
    node = Node()
    form, layout = os.environ["FANOUT_FORM"], os.environ["FANOUT_LAYOUT"]
    servers = os.environ["FANOUT_SERVERS"].split(",")
    rate, seconds, rows = float(os.environ["FANOUT_RATE"]), float(os.environ["FANOUT_SECONDS"]), int(os.environ["FANOUT_ROWS"])
    total = int(rate * seconds) // len(servers) * len(servers)
    senders: dict[str, BatchSender] = {}
    if form == "batch":
        one = BatchSender(node, "chunks")
        for s in servers:
            senders[s] = (
                one if layout == "shared-one" else BatchSender(node, f"chunks/{s}" if layout == "per-server" else "chunks")
            )
            for j in range(rows):
                senders[s].open({"request_id": f"{s}-r{j}"})
    time.sleep(1.0)  # every server subscribed
    started = time.monotonic()
    wall_started, cpu_started = time.time(), time.process_time()
    seqs: dict[str, int] = {}
    for k in range(total):
        due = started + k / rate
        if (wait := due - time.monotonic()) > 0:
            time.sleep(wait)
        if form == "single":
            server = servers[k % len(servers)]
            rid = f"{server}-r{k // len(servers) % 64}"
            seq = seqs.get(rid, 0)
            seqs[rid] = seq + 1
            metadata = {"request_id": rid, "session_id": rid, "seq": seq}
            if layout == "per-server":
                node.send_output(f"chunks/{server}", string_array([" tok"]), metadata)
            else:
                node.send_output("chunks", string_array([" tok"]), {**metadata, SERVER_KEY: server})
            continue
        for s in servers:
            for j in range(rows):
                senders[s].send(f"{s}-r{j}", " tok")
            if layout == "per-server":
                senders[s].emit()
            elif layout == "shared":
                _emit_with(senders[s], {SERVER_KEY: s})
        if layout == "shared-one":
            senders[servers[0]].emit()
    report = {"cpu_s": time.process_time() - cpu_started, "started": wall_started, "ended": time.time()}
    Path("fanout-replica.json").write_text(json.dumps(report))
    time.sleep(0.5)


def _emit_with(sender: BatchSender, metadata: dict[str, str]) -> None:
    """``BatchSender.emit`` with metadata on the message (the shared layout's server name)."""
    recorded: list[tuple[str, pa.Array]] = []

    class Recorder:
        def send_output(self, output: str, data: pa.Array, _: dict[str, str] | None = None) -> None:
            recorded.append((output, data))

    node, sender.node = sender.node, Recorder()
    try:
        sender.emit()
    finally:
        sender.node = node
    for output, data in recorded:
        node.send_output(output, data, metadata)


def server() -> None:
    node = Node()
    me = os.environ["FANOUT_ME"]
    form, layout = os.environ["FANOUT_FORM"], os.environ["FANOUT_LAYOUT"]
    servers = os.environ["FANOUT_SERVERS"].split(",")
    rate, seconds, rows = float(os.environ["FANOUT_RATE"]), float(os.environ["FANOUT_SECONDS"]), int(os.environ["FANOUT_ROWS"])
    total = int(rate * seconds) // len(servers) * len(servers)
    expected = total // len(servers) if form == "single" else total * rows
    mine = {f"{me}-r{j}" for j in range(max(rows, 64))}
    own = messages = dropped = 0
    first = last = None
    while True:
        event = node.next()
        if event is None:
            break
        events = [event]
        if event["type"] == "INPUT":
            try:
                events.extend(node.drain())
            except RuntimeError:
                pass
        for ev in events:
            if ev["type"] != "INPUT":
                continue
            if first is None:
                first = time.process_time()
            messages += 1
            metadata = ev["metadata"]
            target = metadata.get(SERVER_KEY)
            if target is not None and target != me:  # the cheap filter, before any parsing
                dropped += 1
                continue
            value = ev["value"]
            if is_batch(value):
                chunks = parse_batch(value)
                own += sum(1 for c in chunks if c.request_id in mine) if layout == "shared-one" else len(chunks)
            else:
                parse_chunk(texts_of(value), metadata)
                own += 1
            last = time.process_time()
    cpu = (last - first) if first is not None and last is not None else 0.0
    report = {"server": me, "own": own, "expected": expected, "messages": messages, "dropped": dropped, "cpu_s": cpu}
    Path(f"fanout-{me}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    {"replica": replica, "server": server}[sys.argv[1]]()
