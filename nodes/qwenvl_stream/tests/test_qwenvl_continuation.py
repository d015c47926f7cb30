"""Continuing an answer another replica started, on the tiny model: the same tokens as the uninterrupted run.

docs/architecture.md, "Continuation". Greedy decoding on the tiny model is
deterministic, so the answer a replica continues (after the pieces the client
already has) must be token for token the rest of the uninterrupted answer,
in both schemes: continuous batching (text) and ``generate()`` (one at a time,
or seeded).
"""

from __future__ import annotations

from typing import Any

import pytest
from qwenvl_helpers import USER, SpyEngine, check_no_flush, request, spy
from qwenvl_stream.chat import delivered_pieces
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings

from openai_stream_protocol import Chunk, Continuation, ToolCallDelta
from openai_stream_protocol.testing import RecordingNode

pytestmark = pytest.mark.timeout(120)

PROMPT = [USER + "Tell me a long story about the fox"]
MAX_TOKENS = 40


def serve(engine: SpyEngine, events: list[dict[str, Any]], **settings: Any) -> RecordingNode:
    recorder = RecordingNode()
    Scheduler(recorder, engine, Settings(model_name_or_path="tiny", **settings)).run(events)
    return check_no_flush(recorder)


def numbered(chunks: list[Chunk], first: int) -> list[Chunk]:
    assert [c.seq for c in chunks] == list(range(first, first + len(chunks)))
    assert [c.fin for c in chunks] == [False] * (len(chunks) - 1) + [True]
    return chunks


def continued(chunks: list[Chunk]) -> dict[str, Any]:
    return Continuation.of([(c.text, c.tool_call) for c in chunks]).to_metadata()


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({"max_batch": 8}, id="continuous-batching"),
        pytest.param({"max_batch": 1}, id="generate"),
    ],
)
@pytest.mark.parametrize("cut", [1, 12])
def test_a_continued_greedy_answer_has_the_tokens_the_uninterrupted_one_had(
    loaded_model: Any, settings: dict[str, Any], cut: int
) -> None:
    first = spy(loaded_model, **settings)
    whole = numbered(serve(first, [request("r", PROMPT, max_tokens=MAX_TOKENS)], **settings).chunks("r"), 0)
    whole_ids = first.streams["r"].detok.tokens
    assert len(whole_ids) == MAX_TOKENS and whole[-1].finish_reason == "length"
    assert len(whole) > cut + 2

    second = spy(loaded_model, **settings)
    metadata = continued(whole[:cut])
    rest = numbered(serve(second, [request("r~1", PROMPT, max_tokens=MAX_TOKENS, **metadata)], **settings).chunks("r~1"), cut)
    stream = second.streams["r~1"]
    delivered = MAX_TOKENS - stream.max_tokens  # the delivered pieces, re-encoded one by one
    assert 0 < delivered < MAX_TOKENS
    assert stream.detok.tokens[: stream.detok.context] == whole_ids[delivered - stream.detok.context : delivered]
    # The tokens after the cut are the ones the uninterrupted run produced, and so is the text.
    assert stream.detok.tokens[stream.detok.context :] == whole_ids[delivered:]
    assert "".join(c.text for c in whole[:cut] + rest) == "".join(c.text for c in whole)
    # Usage: the prompt as the client sent it; completion tokens only those this replica generated.
    assert rest[-1].prompt_tokens == whole[-1].prompt_tokens
    assert rest[-1].completion_tokens == MAX_TOKENS - delivered
    assert rest[-1].finish_reason == "length"


def test_a_seed_is_carried_so_a_sampled_continuation_is_repeatable(loaded_model: Any) -> None:
    sampled = {"temperature": 1.5, "seed": 11, "max_tokens": 20}
    whole = serve(spy(loaded_model), [request("r", PROMPT, **sampled)]).chunks("r")
    metadata = {**sampled, **continued(whole[:3])}
    runs = [serve(spy(loaded_model), [request("r~1", PROMPT, **metadata)]).chunks("r~1") for _ in range(2)]
    assert [c.text for c in runs[0]] == [c.text for c in runs[1]]
    assert numbered(runs[0], 3)[-1].completion_tokens == runs[1][-1].completion_tokens


def test_a_continuation_with_no_token_left_ends_at_once_with_length(loaded_model: Any) -> None:
    # Every token's text delivered (re-encoding may also give more tokens than were generated): none is left.
    whole = serve(spy(loaded_model), [request("r", PROMPT, max_tokens=6)]).chunks("r")
    texts = [c.text for c in whole]
    [finish] = serve(spy(loaded_model), [request("r~1", PROMPT, max_tokens=6, **Continuation.of(texts).to_metadata())]).chunks(
        "r~1"
    )
    assert (finish.seq, finish.fin, finish.finish_reason, finish.text) == (len(texts), True, "length", "")
    assert finish.completion_tokens == 0


def test_a_malformed_continuation_is_an_error_never_a_fresh_answer(loaded_model: Any) -> None:
    engine = spy(loaded_model)
    [chunk] = serve(engine, [request("r~1", PROMPT, continue_from=2, continued_pieces='["x"]')]).chunks("r~1")
    assert chunk.finish_reason == "error" and "cannot continue" in (chunk.error or "") and not chunk.is_busy
    assert engine.streams == {}  # nothing was generated


def test_delivered_tool_calls_go_back_into_the_turn_as_the_model_wrote_them() -> None:
    continuation = Continuation.of(
        [
            ("Let me look.", None),
            ('{"city": "Paris"}', ToolCallDelta(0, "call_1", "weather")),
            ('{"q": ', ToolCallDelta(1, "call_2", "search")),
            ('"fox"}', ToolCallDelta(1)),
            ("", None),
        ]
    )
    assert delivered_pieces(continuation) == [
        "Let me look.",
        '\n<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        '\n<tool_call>\n{"name": "search", "arguments": {"q": "fox"}}\n</tool_call>',
    ]
