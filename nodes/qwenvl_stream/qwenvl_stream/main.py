"""qwenvl-stream: Qwen2.5-VL answering chat requests token by token over the chunk protocol.

The model is loaded before the node joins the dataflow, so a model that
cannot load ends the process with a message saying why, and the server's
requests only start once the model can answer them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .settings import Settings

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="qwenvl-stream", description="Qwen2.5-VL streaming node for dora-rs")
    parser.add_argument("--name", help="node id when run as a dynamic node (default: the id given by the dataflow)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as exc:
        sys.exit(f"qwenvl-stream: {exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    # Imported here so that `--help` and a bad setting answer without loading torch.
    from .engine import QwenEngine
    from .model import ModelLoadError, load_model
    from .scheduler import Scheduler

    try:
        loaded = load_model(settings)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        sys.exit(f"qwenvl-stream: {exc}")

    from dora import Node

    from openai_stream_protocol import send_hello

    node = Node(args.name) if args.name else Node()
    # The model is loaded: say so. After `dora node restart` (or a restart on another machine) this
    # hello is how the server knows the replica is back (docs/architecture.md, "Replicas and failover").
    send_hello(node, args.name or "qwenvl-stream", "chunks")
    logger.info("qwenvl-stream serving %s (queue of %d)", settings.model_name_or_path, settings.max_queued_requests)
    # dora's stub annotates send_output's metadata as `dict = None`, not Optional.
    Scheduler(node, QwenEngine(loaded, settings), settings).run(node)  # type: ignore[arg-type]


if __name__ == "__main__":
    main()
