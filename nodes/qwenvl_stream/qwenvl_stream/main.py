"""qwenvl-stream: Qwen2.5-VL answering chat requests token by token over the chunk protocol.

The node joins the dataflow first and loads the model after: dora delivers
what is sent to a node only once its process has subscribed, so a node that
loaded for minutes before subscribing lost what the server sent it meanwhile
(after a restart, say). Requests that arrive during the load wait in dora's
queue. The hello goes out once the model is loaded: that is when the server
may count on this replica (docs/architecture.md, "Replicas and failover"). A
model that cannot load ends the process with a message saying why.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from .settings import Settings

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None, *, node_factory: Callable[[str | None], Any] | None = None) -> None:
    """Run the node; ``node_factory`` (tests) makes the dora node from the ``--name`` (default ``dora.Node``)."""
    parser = argparse.ArgumentParser(prog="qwenvl-stream", description="Qwen2.5-VL streaming node for dora-rs")
    parser.add_argument("--name", help="node id when run as a dynamic node (default: the id given by the dataflow)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env(os.environ)
    except ValueError as exc:
        sys.exit(f"qwenvl-stream: {exc}")
    logging.basicConfig(level=settings.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from openai_stream_protocol import Heartbeat, ResendingOutput, check_zenoh_overlay, has_resend_input, node_id_from_env

    if node_factory is None:
        from dora import Node

        def node_factory(name: str | None) -> Any:
            return Node(name) if name else Node()

    check_zenoh_overlay("qwenvl-stream")  # a daemon's relative overlay path would fail in Node(), again on each restart
    dora_node = node_factory(args.name)
    # Rows lost on the way are sent again on the server's ask, where the dataflow gives this node a `resend`
    # input (docs/architecture.md, "Resend"): the senders send through the resend memory.
    resend = has_resend_input(dora_node)
    node = ResendingOutput(dora_node) if resend else dora_node

    # Imported here so that `--help` and a bad setting answer without loading torch.
    from .engine import QwenEngine
    from .model import ModelLoadError, load_model
    from .scheduler import Scheduler

    try:
        loaded = load_model(settings)
    except ModelLoadError as exc:
        logger.error("%s", exc)
        sys.exit(f"qwenvl-stream: {exc}")

    # The model is loaded: say so, and that this node continues answers other replicas started. After a
    # restart (on this machine or another) the hello is how the server knows the replica is back.
    heartbeat = Heartbeat(
        node,
        args.name or node_id_from_env(os.environ, "qwenvl-stream"),
        "chunks",
        interval_s=settings.heartbeat_s,
        can_continue=True,
        can_resend=resend,
    )
    heartbeat.hello()
    logger.info("qwenvl-stream serving %s (queue of %d)", settings.model_name_or_path, settings.max_queued_requests)
    Scheduler(node, QwenEngine(loaded, settings), settings, heartbeat=heartbeat).run(dora_node)


if __name__ == "__main__":
    main()
