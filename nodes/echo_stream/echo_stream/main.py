"""echo-stream: answers each chat request with its last user message, streamed token by token.

A stand-in for a streaming model node. The modules: ``settings`` (the
``ECHO_*`` variables), ``plan`` (what to answer a request with), ``tools``
(tool mode), ``engine`` (``EchoStream``: pacing per request, one message per
chunk), ``step`` (``StepEcho``: one batch message per step) and this
``main``, which reads the settings, joins the dataflow and runs one of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os

from openai_stream_protocol import (
    Heartbeat,
    OutputSender,
    ResendingOutput,
    check_zenoh_overlay,
    has_resend_input,
    node_id_from_env,
)

from .drop import DropEvery
from .engine import CHUNKS_OUTPUT, EchoStream
from .settings import Settings
from .step import StepEcho

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Streaming echo node for dora-rs")
    parser.add_argument("--name", help="node id when run as a dynamic node (default: the id given by the dataflow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ECHO_LOG_LEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(os.environ)

    from dora import Node  # here, so that the logic imports and tests without dora

    check_zenoh_overlay("echo-stream")  # a daemon's relative overlay path would fail in Node(), again on each restart
    node = Node(args.name) if args.name else Node()
    # What the senders send through: the test-only drop injector, under the resend memory that a lost chunk
    # is sent again from (only where the dataflow gives this node a `resend` input: docs/architecture.md, "Resend").
    out: OutputSender = node if not settings.drop_every else DropEvery(node, settings.drop_every)
    resend = has_resend_input(node)
    if resend:
        out = ResendingOutput(out)
    if settings.step_ms and settings.max_concurrent:
        logger.warning("ECHO_MAX_CONCURRENT is ignored in step mode")
        settings = dataclasses.replace(settings, max_concurrent=0)
    # Say we are up: after `dora node restart` that is how the server knows this replica is back. The
    # echo is deterministic, so it can continue any answer another echo replica started.
    node_id = args.name or node_id_from_env(os.environ, "echo-stream")
    heartbeat = Heartbeat(
        node,
        node_id,
        CHUNKS_OUTPUT,
        interval_s=settings.heartbeat_s,
        can_continue=True,
        can_resend=resend,
        models=settings.models,
        capacity=settings.max_concurrent or None,  # the server's admission queue reads it (docs/team.md)
    )
    heartbeat.hello()
    logger.info(
        "echo-stream: %d token(s) per chunk, %.3f s per token%s%s%s%s%s%s",
        settings.tokens_per_chunk,
        settings.token_delay_s,
        ", stamped" if settings.stamp else "",
        ", resends lost chunks" if resend else "",
        f", dropping every {settings.drop_every}th chunk message (ECHO_DROP_EVERY)" if settings.drop_every else "",
        f", step mode: one message every {settings.step_ms:g} ms" if settings.step_ms else "",
        f", at most {settings.max_concurrent} at once" if settings.max_concurrent else "",
        "".join(
            note
            for on, note in (
                (settings.busy, ", answering busy to every request (ECHO_BUSY)"),
                (settings.exit_on, f", exiting when an echo reaches {settings.exit_on!r} (ECHO_EXIT_ON)"),
            )
            if on
        ),
    )
    engine_type = StepEcho if settings.step_ms else EchoStream
    engine = engine_type(out, settings, heartbeat=heartbeat)
    engine.run(node)


if __name__ == "__main__":
    main()
