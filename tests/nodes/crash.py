"""A model node that dies: sends ``CRASH_AFTER_CHUNKS`` chunks of its first request, then exits with 1."""

from __future__ import annotations

import sys

from _common import REQUEST_OUTPUT, env_int, request_of, send_chunk, setup
from dora import Node


def main() -> None:
    log = setup("crash")
    after = env_int("CRASH_AFTER_CHUNKS", 1)
    node = Node()
    for event in node:
        if event["type"] == "STOP":
            break
        if event["type"] == "INPUT" and event["id"] == REQUEST_OUTPUT:
            request_id, tokens = request_of(event)
            for seq in range(min(after, len(tokens))):
                send_chunk(node, str(request_id), seq, tokens[seq])
            log.error("request %s: crashing on purpose after %d chunk(s)", request_id, after)
            sys.exit(1)


if __name__ == "__main__":
    main()
