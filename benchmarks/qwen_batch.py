"""qwenvl_stream batched generation: aggregate tokens/s at 1, 4 and 8 concurrent requests, batched vs one at a time.

Drives the node's own ``Scheduler`` and ``QwenEngine`` (no dora, no HTTP) with a fake node that
records when each batch message goes out, on a small random Qwen2.5-VL built here (no download).
The model is sized so that a decode step is compute- and memory-bound on a CPU, not dominated by
Python: hidden 1024, 8 layers, MLP 2816, 16 heads (4 KV heads), 91.5 M parameters, float32; the
vision tower is one small block. Every answer runs to ``--tokens`` (end of text is never chosen).

Schemes, each at 1, 4 and 8 requests sent at once:

- ``one-at-a-time``: ``QWENVL_MAX_BATCH=1``, one ``generate()`` per request (the old path);
- ``batched``: ``QWENVL_MAX_BATCH=8``, text-only requests in transformers' continuous batching;
- ``generate-batch``: ``QWENVL_MAX_BATCH=8`` with ``QWENVL_CONTINUOUS_BATCHING=0``: the waiting
  requests share one left-padded ``generate()`` (the scheme requests with images take);
- ``--images`` adds the same two schemes with a 56x56 image in every request.

Aggregate tokens/s = all completion tokens / (last finish row - first request); time to first
token = first text row of a request - the moment all requests were handed over (median over
requests). Medians of ``--runs`` repeats. Other benchmarks share the two cores, so run it under
the shared lock:

    flock /tmp/oss-bench.lock .venv/bin/python -m benchmarks.qwen_batch --runs 3

On a GPU host (bf16; batches 1, 8 and 32), with the real checkpoint instead of the random model:

    .venv/bin/python -m benchmarks.qwen_batch --model Qwen/Qwen2.5-VL-3B-Instruct --device cuda \\
        --concurrency 1 8 32 --max-batch 32 --tokens 256 --runs 3
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "nodes" / "qwenvl_stream" / "tests"))  # the test model's tokenizer and template

USER = "<|user|>\n<|im_start|>\n"
IMAGE = "<|user|>\n<|vision_start|>\n"
PROMPTS = [
    "Describe the image in one sentence.",
    "The quick brown fox jumps over the lazy dog. What happens next?",
    "Hello, world! Streaming tokens one by one over a dora dataflow.",
    "Tell me a long story about the fox and the dog on the white table.",
]


def build_model(path: Path) -> Path:
    """A random Qwen2.5-VL of 91.5 M parameters with the tests' tokenizer and chat template."""
    from qwenvl_tiny_model import ModelSize, build_tiny_model

    # head_dim 64: mrope_section sums to 32. Every answer runs to max_tokens (no end of text).
    size = ModelSize(
        hidden=1024,
        intermediate=2816,
        layers=8,
        heads=16,
        kv_heads=4,
        mrope_section=(16, 8, 8),
        max_positions=4096,
        vision_hidden=64,
        vision_intermediate=128,
        max_pixels=56 * 56,
    )
    return build_tiny_model(path, size)


def png_data_uri() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (56, 56), (0, 128, 255)).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


class TimingNode:
    """The node's ``send_output``: notes when each request's first text row and its finish row leave."""

    def __init__(self) -> None:
        self.first: dict[str, float] = {}
        self.done: dict[str, tuple[float, int]] = {}
        self.messages = 0
        self.all_done = threading.Event()
        self.warm = threading.Event()
        self.warmed = 0
        self.expected = 0

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        from openai_stream_protocol import parse_batch

        now = time.perf_counter()
        if self.warm.is_set():
            self.messages += 1
        for chunk in parse_batch(data):
            if chunk.request_id is not None and chunk.request_id.startswith("warm-up"):
                if chunk.fin:
                    self.warmed += 1
                    if self.warmed == 2:
                        self.warm.set()
                continue
            if chunk.request_id is None:
                continue
            if chunk.text and chunk.request_id not in self.first:
                self.first[chunk.request_id] = now
            if chunk.fin:
                if chunk.error:
                    raise RuntimeError(f"{chunk.request_id}: {chunk.error}")
                self.done[chunk.request_id] = (now, chunk.completion_tokens or 0)
        if len(self.done) >= self.expected:
            self.all_done.set()


def one_run(loaded: Any, scheme: str, concurrency: int, tokens: int, max_batch: int, image: str | None) -> dict[str, float]:
    from qwenvl_stream.engine import QwenEngine
    from qwenvl_stream.scheduler import Scheduler
    from qwenvl_stream.settings import Settings

    settings = Settings(
        model_name_or_path="bench",
        max_batch=1 if scheme == "one-at-a-time" else max_batch,
        continuous_batching=scheme == "batched",
        max_queued_requests=max(16, concurrency),
        max_tokens_limit=max(tokens, 8192),
    )
    node = TimingNode()
    node.expected = concurrency
    started: dict[str, float] = {}
    ready = threading.Event()

    def events() -> Any:
        ready.wait(120)  # the engine thread has started (continuous batching's manager is up)
        # Two short requests first, untimed: continuous batching allocates its cache and settles in over
        # its first requests (measured: 25 then 31 tok/s for the first two alone), a cost a running
        # node pays once, not per request.
        for k in range(2):
            meta = {"request_id": f"warm-up-{k}", "session_id": f"warm-up-{k}", "model": "m", "stream": True, "max_tokens": 16}
            yield {
                "type": "INPUT",
                "id": "v1/chat/completions",
                "value": pa.array([USER + "Hi"], type=pa.string()),
                "metadata": meta,
            }
        node.warm.wait(120)
        started["t0"] = time.perf_counter()
        for i in range(concurrency):
            texts = ([IMAGE + image] if image else []) + [USER + PROMPTS[i % len(PROMPTS)] + f" ({i})"]
            meta = {"request_id": f"r{i}", "session_id": f"r{i}", "model": "m", "stream": True, "max_tokens": tokens}
            yield {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array(texts, type=pa.string()), "metadata": meta}
        node.all_done.wait(600)

    engine = QwenEngine(loaded, settings)
    start = engine.start

    def start_and_signal(on_step: Any) -> None:
        start(on_step)
        ready.set()

    engine.start = start_and_signal  # type: ignore[method-assign]
    Scheduler(node, engine, settings).run(events())
    t0 = started["t0"]
    end = max(at for at, _ in node.done.values())
    total = sum(n for _, n in node.done.values())
    return {
        "tokens_per_s": total / (end - t0),
        "ttft_s": statistics.median(node.first[r] - t0 for r in node.done),
        "messages": node.messages,
        "tokens": total,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model directory or hub id (default: the random model built here)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="torch threads on the CPU")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of every request (all run to it)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--schemes", nargs="+", default=["one-at-a-time", "batched", "generate-batch"])
    parser.add_argument("--images", action="store_true", help="also every request with an image")
    parser.add_argument("--json", type=Path, help="write the medians here")
    args = parser.parse_args(argv)

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from qwenvl_stream.model import load_model
    from qwenvl_stream.settings import Settings

    with tempfile.TemporaryDirectory(prefix="qwen-batch-") as tmp:
        model_path = args.model or str(build_model(Path(tmp)))
        loaded = load_model(Settings(model_name_or_path=model_path, device=args.device))
    n_params = sum(p.numel() for p in loaded.model.parameters())
    print(
        f"model: {n_params / 1e6:.1f} M parameters on {loaded.placement.device} ({loaded.placement.dtype}), "
        f"{args.threads} torch threads, {args.tokens} tokens per request, max batch {args.max_batch}"
    )
    cases = [(scheme, None) for scheme in args.schemes]
    if args.images:
        image = png_data_uri()
        cases += [("one-at-a-time", image), ("generate-batch", image)]
    one_run(loaded, "batched", 2, 4, args.max_batch, None)  # warm-up
    results: dict[str, dict[int, dict[str, float]]] = {}
    for scheme, image in cases:
        label = scheme + (" +image" if image else "")
        for concurrency in args.concurrency:
            runs = [one_run(loaded, scheme, concurrency, args.tokens, args.max_batch, image) for _ in range(args.runs)]
            median = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
            results.setdefault(label, {})[concurrency] = median
            print(
                f"{label:24s} c={concurrency:<3d} {median['tokens_per_s']:8.1f} tok/s  "
                f"ttft {median['ttft_s'] * 1000:8.0f} ms  messages {median['messages']:.0f}",
                flush=True,
            )
    print()
    print(
        "| scheme | " + " | ".join(f"{c} at once: tok/s" for c in args.concurrency) + f" | TTFT at {args.concurrency[-1]} (ms) |"
    )
    print("| :--- | " + " | ".join("---:" for _ in args.concurrency) + " | ---: |")
    for label, by_c in results.items():
        cells = " | ".join(f"{by_c[c]['tokens_per_s']:.1f}" for c in args.concurrency)
        print(f"| {label} | {cells} | {by_c[args.concurrency[-1]]['ttft_s'] * 1000:.0f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
