"""Split invariance of the qwen node's parsers: ``<think>`` and ``<tool_call>`` read the same whatever the token boundaries.

The model's text is cut into tokens at random points (inside a tag, inside the JSON of a call, between
the code points of an emoji sequence, empty tokens too) and fed to the parsers the node chains for a
request (``parsing.OutputParser``: ``ThinkParser`` then ``ToolCallParser``). What comes out, adjacent
pieces of one kind joined, must be what the whole text gives at once; for a well-formed answer, it must
also be the reasoning, text and calls the model meant. ``--hypothesis-show-statistics`` counts the cases.
"""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from qwenvl_stream.parsing import OutputParser, Piece, Reasoning
from qwenvl_stream.thinking import ThinkParser
from qwenvl_stream.toolcalls import ToolCallParser

from openai_stream_protocol import ToolCall

EXAMPLES = 1000

FRAGMENTS = [
    "<think>", "</think>", "<tool_call>", "</tool_call>", "<", ">", "/", "<thi", "nk>", "</tool", "_call>", "\n", " ",
    '{"name": "f", "arguments": {"a": 1}}', '{"name": "g"', ', "arguments": {}}', "{", "}", '"', "😀", "👨\u200d👩\u200d👧", "é",
]  # fmt: skip
model_text = st.lists(st.sampled_from(FRAGMENTS) | st.text(max_size=3), max_size=25).map("".join)


def cut(draw: st.DrawFn, text: str) -> list[str]:
    cuts = sorted(draw(st.lists(st.integers(0, len(text)), max_size=12)))
    edges = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def parser(inside: bool, tools: bool) -> OutputParser:
    counter = itertools.count()
    tool_parser = ToolCallParser(new_id=lambda: f"call_{next(counter)}") if tools else None
    return OutputParser(ThinkParser(inside=inside), tool_parser)


def parse(tokens: list[str], inside: bool, tools: bool) -> list[Piece]:
    """Feed the tokens and flush; adjacent reasoning (or text) joined: where they break does not matter to a client."""
    p = parser(inside, tools)
    out: list[Piece] = []
    for piece in [*(x for token in tokens for x in p.feed(token)), *p.flush()]:
        assert not isinstance(piece, (str, Reasoning)) or (piece if isinstance(piece, str) else piece.text), "no empty pieces"
        if isinstance(piece, Reasoning) and out and isinstance(out[-1], Reasoning):
            out[-1] = Reasoning(out[-1].text + piece.text)
        elif isinstance(piece, str) and out and isinstance(out[-1], str):
            out[-1] += piece
        else:
            out.append(piece)
    return out


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.data(), model_text, st.booleans(), st.booleans())
def test_any_text_parses_the_same_however_it_is_tokenised(data: st.DataObject, text: str, inside: bool, tools: bool) -> None:
    tokens = cut(data.draw, text)
    assert parse(tokens, inside, tools) == parse([text], inside, tools)


plain = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20).filter(lambda s: "<" not in s and s.strip() == s)
arguments = st.dictionaries(st.sampled_from(["city", "n", "😀"]), st.integers() | st.text(max_size=5) | st.booleans(), max_size=3)


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    st.data(),
    plain,
    plain,
    st.lists(st.tuples(st.sampled_from(["get_weather", "lookup"]), arguments), max_size=2),
    st.booleans(),
)
def test_a_thinking_answer_with_calls_comes_out_as_the_model_meant(
    data: st.DataObject, reasoning: str, answer: str, calls: list[tuple[str, dict[str, Any]]], inside: bool
) -> None:
    """Qwen3's shape: ``<think>`` (or opened by the template), the reasoning, ``</think>``, a blank line, the answer,
    then each call in its tags on a line of its own."""
    text = ("" if inside else "<think>") + f"\n{reasoning}\n</think>\n\n{answer}"
    for name, args in calls:
        text += "\n<tool_call>\n" + json.dumps({"name": name, "arguments": args}, ensure_ascii=data.draw(st.booleans()))
        text += "\n</tool_call>"
    got = parse(cut(data.draw, text), inside, tools=True)
    expected: list[Piece] = [Reasoning(f"\n{reasoning}\n")]
    if answer:  # the line break before a call stays with the text before it, as the tool-call parser keeps it
        expected.append(answer + ("\n" if calls else ""))
    expected += [ToolCall(f"call_{i}", name, json.dumps(args, ensure_ascii=False)) for i, (name, args) in enumerate(calls)]
    assert got == expected
