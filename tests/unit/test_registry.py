"""StreamRegistry bookkeeping that the other files do not cover."""

from __future__ import annotations

from openai_stream_protocol import Chunk
from openai_stream_server.metrics import Metrics
from openai_stream_server.registry import StreamRegistry
from openai_stream_server.settings import Settings
from tests.live import metric


def test_chunks_released_from_the_reorder_buffer_are_counted_as_delivered() -> None:
    """Regression: ``oss_chunks_total`` counted only the chunk that arrived in order, not the held ones it released."""
    metrics = Metrics()
    registry = StreamRegistry(Settings(), metrics, on_cancel=lambda _: None)
    state = registry.open("chatcmpl-1", "m", prompt_tokens=1, surface="chat")
    registry.deliver([Chunk("chatcmpl-1", 2, "c", fin=True, finish_reason="stop"), Chunk("chatcmpl-1", 1, "b")])
    registry.deliver([Chunk("chatcmpl-1", 0, "a")])
    text = metrics.render().decode()
    assert state.log.text == "abc"
    assert metric(text, "oss_reordered_chunks_total") == 2
    assert metric(text, "oss_chunks_total") == 3


def test_a_chunk_without_id_is_never_routed_by_the_registry() -> None:
    """Only the backend knows which replica a reply without an id came from: it names it, or it is dropped."""
    metrics = Metrics()
    registry = StreamRegistry(Settings(), metrics, on_cancel=lambda _: None)
    state = registry.open("chatcmpl-1", "m", prompt_tokens=1, surface="chat")
    registry.deliver([Chunk(None, None, "", fin=True, finish_reason="stop"), Chunk(None, 0, "x")])
    assert not state.done and state.log.pieces == []
    assert metric(metrics.render().decode(), 'oss_dropped_chunks_total{reason="unknown"}') == 2
