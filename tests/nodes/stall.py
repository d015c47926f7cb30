"""A model node that answers one chunk, then stalls forever (idle timeout tests); records cancels."""

from __future__ import annotations

from _common import CANCEL_OUTPUT, REQUEST_OUTPUT, CancelLog, request_of, send_chunk, setup
from dora import Node


def main() -> None:
    log = setup("stall")
    node, cancels = Node(), CancelLog()
    for event in node:
        if event["type"] == "STOP":
            break
        if event["type"] != "INPUT":
            continue
        if event["id"] == REQUEST_OUTPUT:
            request_id, tokens = request_of(event)
            if request_id:
                send_chunk(node, request_id, 0, tokens[0] if tokens else "first")
                log.info("request %s: sent seq 0, stalling", request_id)
        elif event["id"] == CANCEL_OUTPUT:
            cancels.handle(event)


if __name__ == "__main__":
    main()
