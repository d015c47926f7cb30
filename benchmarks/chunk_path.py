"""The server's chunk path in one process, no dora, no HTTP: ``registry.deliver`` -> ``StreamState`` ->
``chunk_events`` bytes, for many streams stepped together (what one step-mode batch message does).

It isolates the part of the per-chunk CPU that is pure Python on the event loop, where a change
to ``state.py``, ``registry.py`` or ``api/follow.py`` or ``api/chat/render.py`` shows without the noise of the whole
dataflow (benchmarks/README.md, "Chunk path"). ``--server-src DIR`` imports
``openai_stream_server`` from DIR (a ``git archive`` of another commit of the same layout) for
before/after runs; for an older layout, run that tree's own copy of this script.

Run: ``python -m benchmarks.chunk_path [--streams 1000] [--steps 30] [--runs 7] [--server-src DIR]``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any


def _load(server_src: Path | None) -> dict[str, Any]:
    if server_src is not None:
        sys.path.insert(0, str(server_src))
    from openai_stream_protocol import Chunk
    from openai_stream_server.api.chat.render import ChunkEncoder, ChunkRenderer
    from openai_stream_server.api.follow import follow
    from openai_stream_server.metrics import Metrics
    from openai_stream_server.registry import StreamRegistry
    from openai_stream_server.settings import Settings

    def chunk_events(state: Any, encoder: Any, metrics: Any) -> Any:
        """The chat stream of ``state``: the loop every surface's stream runs, with chat's renderer."""
        return follow(ChunkRenderer(state, encoder), metrics)

    return {
        "Chunk": Chunk,
        "Metrics": Metrics,
        "StreamRegistry": StreamRegistry,
        "Settings": Settings,
        "ChunkEncoder": ChunkEncoder,
        "chunk_events": chunk_events,
    }


async def one_run(m: dict[str, Any], streams: int, steps: int) -> float:
    """CPU microseconds per chunk for ``streams`` streams of ``steps`` chunks, each step one delivered batch."""
    metrics = m["Metrics"]()
    registry = m["StreamRegistry"](m["Settings"](), metrics, on_cancel=lambda request_id: None)
    states = [registry.open(f"chatcmpl-{i:x}", "m", 3, "chat") for i in range(streams)]
    events = 0

    async def consume(state: Any) -> None:
        nonlocal events
        async for _ in m["chunk_events"](state, m["ChunkEncoder"](state.request_id, "m", 1), metrics):
            events += 1

    tasks = [asyncio.create_task(consume(state)) for state in states]
    await asyncio.sleep(0)
    chunk = m["Chunk"]
    started = time.process_time()
    for step in range(steps):
        last = step == steps - 1
        registry.deliver([chunk(s.request_id, step, " tok", fin=last, finish_reason="stop" if last else None) for s in states])
        for _ in range(3):  # let every stream write its event before the next step, as the paced steps do
            await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 60)
    elapsed = time.process_time() - started
    assert events >= streams * 2, events  # role chunk, coalesced content, finish and [DONE] per stream
    return elapsed / (streams * steps) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--server-src", type=Path, help="import openai_stream_server from this directory instead")
    args = parser.parse_args(argv)
    modules = _load(args.server_src)
    results = [asyncio.run(one_run(modules, args.streams, args.steps)) for _ in range(max(1, min(args.runs, 50)))]
    source = args.server_src or "this checkout"
    print("| server | streams x steps | runs | us per chunk, median | min | max |")
    print("| :--- | ---: | ---: | ---: | ---: | ---: |")
    print(
        f"| {source} | {args.streams} x {args.steps} | {len(results)} | {statistics.median(results):.2f} |"
        f" {min(results):.2f} | {max(results):.2f} |"
    )


if __name__ == "__main__":
    main()
