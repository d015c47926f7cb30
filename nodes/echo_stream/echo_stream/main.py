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
import re
from collections.abc import Mapping

from openai_stream_protocol import send_hello

from .engine import CHUNKS_OUTPUT, EchoStream
from .settings import Settings
from .step import StepEcho

logger = logging.getLogger(__name__)


def _node_id(environ: Mapping[str, str]) -> str:
    """This node's id from dora's ``DORA_NODE_CONFIG`` (a ``node_id: <id>`` line), else the package name."""
    match = re.search(r"^node_id: *(\S+)", environ.get("DORA_NODE_CONFIG", ""), re.MULTILINE)
    return match.group(1) if match else "echo-stream"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Streaming echo node for dora-rs")
    parser.add_argument("--name", help="node id when run as a dynamic node (default: the id given by the dataflow)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=os.environ.get("ECHO_LOG_LEVEL", "INFO").upper(), format="%(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env(os.environ)

    from dora import Node  # here, so that the logic imports and tests without dora

    node = Node(args.name) if args.name else Node()
    if settings.step_ms and settings.max_concurrent:
        logger.warning("ECHO_MAX_CONCURRENT is ignored in step mode")
        settings = dataclasses.replace(settings, max_concurrent=0)
    # Say we are up: after `dora node restart` that is how the server knows this replica is back.
    send_hello(node, args.name or _node_id(os.environ), CHUNKS_OUTPUT)
    logger.info(
        "echo-stream: %d token(s) per chunk, %.3f s per token%s%s%s",
        settings.tokens_per_chunk,
        settings.token_delay_s,
        ", stamped" if settings.stamp else "",
        f", step mode: one message every {settings.step_ms:g} ms" if settings.step_ms else "",
        f", at most {settings.max_concurrent} at once" if settings.max_concurrent else "",
    )
    engine = StepEcho(node, settings) if settings.step_ms else EchoStream(node, settings)
    engine.run(node)


if __name__ == "__main__":
    main()
