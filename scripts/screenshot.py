"""Take docs/demo.png: the demo page mid-stream in headless Chromium, served by the real dataflow.

Not part of the test suite. Run from the repository root:

    .venv/bin/python scripts/screenshot.py [--out docs/demo.png]

Needs ``playwright`` (the test extra) and Debian's ``/usr/bin/chromium``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browser.chromium import DemoPage, chromium_context  # noqa: E402
from tests.dataflow import Dataflow  # noqa: E402

PROMPT = (
    "Every token of this answer travels through a dora-rs dataflow: the openai-stream-server node turns the "
    "HTTP request into a dora message, the echo-stream node answers with numbered chunks, and the server relays "
    "them as chat.completion.chunk events. This page asked in background mode and follows the completion with "
    "an EventSource; if the connection drops, the browser reconnects with Last-Event-ID and the text picks up "
    "exactly where it stopped, with no duplicate and no hole."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.png")
    parser.add_argument("--fraction", type=float, default=0.55, help="how much of the answer is shown when the shot is taken")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.06"}}
        with Dataflow(ROOT / "dataflow-stream.yml", Path(tmp) / "flow", env=env) as flow:
            with chromium_context(Path(tmp) / "profile", viewport={"width": 900, "height": 720}) as context:
                page = context.new_page()
                demo = DemoPage(page, flow.base_url).open()
                page.wait_for_selector("#health.ok")
                demo.ask("warm-up")  # the very first request pays for cold start-up; show a typical one
                demo.wait_state("done", "error", "cancelled")
                demo.ask(PROMPT)
                demo.wait_answer_length(int(len(PROMPT) * args.fraction), timeout_s=60)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(args.out))
                demo.wait_state("done", "error", "cancelled")
                if demo.answer() != PROMPT:
                    raise SystemExit("the page did not end with the exact echo")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
