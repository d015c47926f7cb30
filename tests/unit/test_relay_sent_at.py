"""``relay_sent_at`` (benchmarks only): streamed chunks carry the node's send time of their oldest chunk.

The benchmark's paced scenario measures added delay as the client's arrival
time minus this stamp (same machine, same clock). Off by default, and then
the bytes are exactly what they were without it.
"""

from __future__ import annotations

import orjson
import pytest

from openai_stream_protocol import Chunk
from openai_stream_server.api.chat.render import ChunkEncoder, ChunkRenderer
from openai_stream_server.api.follow import follow
from openai_stream_server.metrics import Metrics
from openai_stream_server.settings import Settings, load_settings
from openai_stream_server.state import StreamState

pytestmark = pytest.mark.timeout(10)


def test_off_by_default_and_bytes_unchanged() -> None:
    assert Settings().relay_sent_at is False
    plain = ChunkEncoder("chatcmpl-1", "m", 1)
    assert not plain.relay_sent_at
    assert plain.content("hi", 0, 1234.5) == plain.content("hi", 0) == plain.content("hi")  # an unrelayed stamp is dropped


@pytest.mark.parametrize("raw, expected", [("1", True), ("true", True), ("on", True), ("0", False), ("False", False)])
def test_setting_reads_booleans(raw: str, expected: bool) -> None:
    assert load_settings([], {"OPENAI_STREAM_SERVER_RELAY_SENT_AT": raw}).relay_sent_at is expected


def test_setting_rejects_other_values() -> None:
    with pytest.raises(SystemExit):
        load_settings([], {"OPENAI_STREAM_SERVER_RELAY_SENT_AT": "maybe"})


def test_stamp_is_a_top_level_field() -> None:
    encoder = ChunkEncoder("chatcmpl-1", "m", 1, include_usage=True, relay_sent_at=True)
    event = orjson.loads(encoder.content("hi", 3, 1700000000.125)[len(b"data: ") :])
    assert event["x_sent_at"] == 1700000000.125
    assert event["choices"][0]["delta"] == {"content": "hi"} and event["usage"] is None


async def test_coalesced_event_carries_the_oldest_stamp() -> None:
    state = StreamState("chatcmpl-1", "m", "chat")
    for seq, (text, sent_at) in enumerate([("a", 10.0), ("b", 11.0), ("c", 12.0)]):
        state.accept(Chunk("chatcmpl-1", seq, text, sent_at=sent_at), 0.0)
    state.accept(Chunk("chatcmpl-1", 3, "", fin=True, finish_reason="stop"), 0.0)
    encoder = ChunkEncoder("chatcmpl-1", "m", 1, relay_sent_at=True)
    events = [e async for e in follow(ChunkRenderer(state, encoder), Metrics())]
    content = [orjson.loads(e[len(b"data: ") :]) for e in events if b'"content":"' in e and b'"content":""' not in e]
    assert [(c["choices"][0]["delta"]["content"], c["x_sent_at"]) for c in content] == [("abc", 10.0)]
