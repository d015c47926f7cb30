"""The ``<think>`` parser of qwenvl-stream: reasoning first, then the answer, whatever the token boundaries."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from qwenvl_stream.thinking import Run, ThinkParser, opens_thinking


def parse(pieces: Sequence[str], *, inside: bool = False) -> list[Run]:
    """Feed the pieces, flush, and merge adjacent runs of one kind (where runs break does not matter to a client)."""
    parser = ThinkParser(inside=inside)
    out: list[Run] = []
    for reasoning, text in [*(run for piece in pieces for run in parser.feed(piece)), *parser.flush()]:
        assert text, "no empty runs"
        if out and out[-1][0] == reasoning:
            out[-1] = (reasoning, out[-1][1] + text)
        else:
            out.append((reasoning, text))
    return out


QWEN3 = "<think>\nThe user says hi. I greet back.\n</think>\n\nHello! 👋"
EXPECTED = [(True, "\nThe user says hi. I greet back.\n"), (False, "Hello! 👋")]


@pytest.mark.parametrize("cut", range(len(QWEN3) + 1))
def test_split_anywhere_in_two_pieces(cut: int) -> None:
    assert parse([QWEN3[:cut], QWEN3[cut:]]) == EXPECTED


def test_one_character_at_a_time() -> None:
    assert parse(list(QWEN3)) == EXPECTED


@pytest.mark.parametrize(
    "text, inside, expected",
    [
        ("plain answer", False, [(False, "plain answer")]),
        ("  \n indented answer", False, [(False, "  \n indented answer")]),
        ("<think>never closed", False, [(True, "never closed")]),
        ("<think>ends in a partial </thi", False, [(True, "ends in a partial </thi")]),
        ("<thinking> is a word here", False, [(False, "<thinking> is a word here")]),
        ("<thi", False, [(False, "<thi")]),
        ("answer <think>not a tag mid-answer</think>", False, [(False, "answer <think>not a tag mid-answer</think>")]),
        ("opened by the template</think>\n\nanswer", True, [(True, "opened by the template"), (False, "answer")]),
        ("<think></think>\n\nno thoughts", False, [(False, "no thoughts")]),
        ("<think>a</think>b</think>", False, [(True, "a"), (False, "b</think>")]),
        ("", False, []),
    ],
)
def test_tags_and_what_they_leave(text: str, inside: bool, expected: list[Run]) -> None:
    assert parse([text], inside=inside) == expected
    assert parse(list(text), inside=inside) == expected


def test_reasoning_is_released_as_it_comes_and_only_a_possible_tag_is_held() -> None:
    parser = ThinkParser()
    assert parser.feed("  <thi") == []  # the output may still open with <think>
    assert parser.feed("nk>I wonder") == [(True, "I wonder")]
    assert parser.reasoning
    assert parser.feed(" if </") == [(True, " if ")]
    assert parser.feed("think>\n") == []
    assert not parser.reasoning
    assert parser.feed("Yes") == [(False, "Yes")]
    assert parser.feed(" and <think> no") == [(False, " and <think> no")]
    assert parser.flush() == []


@pytest.mark.parametrize(
    "prompt, opened",
    [
        ("<|im_start|>assistant\n<think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>assistant\n", False),
    ],
)
def test_a_prompt_the_template_opened_the_reasoning_in(prompt: str, opened: bool) -> None:
    assert opens_thinking(prompt) is opened
