"""A model node that tries to make the server hold too much memory; what it does depends on the prompt.

  flood            empty chunks, seq 0, 1, 2, ... and never a finish marker, until cancelled
                   (or HOG_FLOOD_MAX chunks)
  ahead N SIZE     seq 1..N (never seq 0), SIZE bytes each: every one has to be held for reordering
  hold N SIZE      seq 0..N-1, SIZE bytes each, then nothing more (no finish marker) until cancelled
  big N SIZE       seq 0..N-1, SIZE bytes each, the last one with the finish marker
  anything else    echoed back word by word, then the finish marker

Environment:
  HOG_FLOOD_MAX  (2000000)  a flood stops after this many chunks even if never cancelled
  CANCEL_LOG                file that receives the id of every cancel (see _common.py)
"""

from __future__ import annotations

from _common import CANCEL_OUTPUT, REQUEST_OUTPUT, CancelLog, env_int, send_chunk, setup
from dora import Node

from openai_stream_protocol import last_user_text, parse_request_texts, request_id_of, texts_of

MAX_ROUNDS = 10_000_000  # bound the loop; a test dataflow never comes near
BURST = 64  # flood chunks sent between two looks at the input queue


def main() -> None:
    log = setup("hog")
    flood_max = env_int("HOG_FLOOD_MAX", 2_000_000)
    node, cancels = Node(), CancelLog()
    floods: dict[str, int] = {}  # request id -> next seq

    def answer(request_id: str, words: list[str]) -> None:
        mode = words[0] if words else ""
        if mode == "flood":
            floods[request_id] = 0
            log.info("request %s: flooding empty chunks", request_id)
        elif mode in ("ahead", "hold", "big") and len(words) == 3:
            count, size = int(words[1]), int(words[2])
            first = 1 if mode == "ahead" else 0
            for seq in range(first, first + count):
                send_chunk(node, request_id, seq, "x" * size, fin=mode == "big" and seq == first + count - 1)
            log.info("request %s: %s %d chunks of %d bytes", request_id, mode, count, size)
        else:
            for seq, word in enumerate(words):
                send_chunk(node, request_id, seq, word if seq == 0 else " " + word)
            send_chunk(node, request_id, len(words), "", fin=True)

    for _ in range(MAX_ROUNDS):
        if floods:
            for request_id in list(floods):
                first = floods[request_id]
                for seq in range(first, first + BURST):
                    send_chunk(node, request_id, seq, "")
                floods[request_id] = first + BURST
                if floods[request_id] >= flood_max:
                    del floods[request_id]
                    log.info("request %s: flood stopped after %d chunks, never cancelled", request_id, flood_max)
            events = node.drain()
        else:
            event = node.next()
            if event is None:
                break
            events = [event]
        stop = False
        for event in events:
            if event["type"] == "STOP":
                stop = True
            elif event["type"] != "INPUT":
                continue
            elif event["id"] == REQUEST_OUTPUT:
                request_id = request_id_of(event.get("metadata") or {})
                if request_id:
                    answer(request_id, last_user_text(parse_request_texts(texts_of(event["value"]))).split())
            elif event["id"] == CANCEL_OUTPUT:
                gone = cancels.handle(event)
                if gone and floods.pop(gone, None) is not None:
                    log.info("request %s: flood cancelled", gone)
        if stop:
            break


if __name__ == "__main__":
    main()
