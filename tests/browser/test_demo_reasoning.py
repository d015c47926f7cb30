"""The demo page shows a reasoning model's thinking folded above the answer (``echo-stream``'s reasoning mode)."""

from __future__ import annotations

import pytest

from tests.browser.chromium import DemoPage

pytestmark = [pytest.mark.browser, pytest.mark.e2e, pytest.mark.timeout(180)]

THOUGHT = "The user wants a greeting; keep it short — ✓ naïve."
ANSWER = "Hello there, friend!"


def test_reasoning_is_folded_above_the_answer(demo: DemoPage) -> None:
    demo.ask(f"<think>{THOUGHT}</think>{ANSWER}")
    assert demo.wait_state("done", "error", "cancelled") == "done"
    assert demo.answer() == ANSWER
    page = demo.page
    fold = page.eval_on_selector(
        "#reasoning",
        "d => ({hidden: d.hidden, open: d.open, text: d.querySelector('#reasoning-text').textContent,"
        " above: !!(d.compareDocumentPosition(document.getElementById('answer')) & Node.DOCUMENT_POSITION_FOLLOWING)})",
    )
    assert fold == {"hidden": False, "open": False, "text": THOUGHT, "above": True}
    assert demo.text("#reasoning-summary").startswith("Reasoning · ")
    assert not page.is_visible("#reasoning-text")  # folded
    page.click("#reasoning-summary")
    assert page.is_visible("#reasoning-text")
    assert demo.errors == []


def test_an_answer_without_reasoning_shows_no_fold_and_a_new_prompt_clears_it(demo: DemoPage) -> None:
    demo.ask(f"<think>{THOUGHT}</think>{ANSWER}")
    assert demo.wait_state("done", "error") == "done"
    demo.ask("plain question")
    assert demo.wait_state("done", "error") == "done"
    assert demo.answer() == "plain question"
    assert demo.page.eval_on_selector("#reasoning", "d => d.hidden") is True
    assert demo.page.eval_on_selector("#reasoning-text", "d => d.textContent") == ""
