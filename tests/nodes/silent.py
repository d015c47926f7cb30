"""A model node that never answers: takes requests, records cancels (first-chunk timeout tests)."""

from __future__ import annotations

from _common import CANCEL_OUTPUT, REQUEST_OUTPUT, CancelLog, request_of, setup
from dora import Node


def main() -> None:
    log = setup("silent")
    node, cancels = Node(), CancelLog()
    for event in node:
        if event["type"] == "STOP":
            break
        if event["type"] != "INPUT":
            continue
        if event["id"] == REQUEST_OUTPUT:
            log.info("request %s: not answering", request_of(event)[0])
        elif event["id"] == CANCEL_OUTPUT:
            cancels.handle(event)


if __name__ == "__main__":
    main()
