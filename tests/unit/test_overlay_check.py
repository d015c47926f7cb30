"""The server and both nodes stop with one line when ``DORA_ZENOH_CONFIG_OVERLAY`` names no file (docs/deploy.md,
"Several machines").

A daemon started with a relative ``--zenoh-config-overlay`` hands that path to its nodes, which under
``dora start`` run where it does not resolve; dora's ``Node()`` would fail, and a restart policy would
start the node again and again. Each program checks before ``Node()``: run here outside any dataflow,
it must stop on the check, not reach ``Node()`` (which would fail differently, with a traceback).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.dataflow import BIN_DIR

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("program", ["openai-stream-server", "echo-stream", "qwenvl-stream"])
def test_a_relative_overlay_path_that_does_not_resolve_stops_the_program_with_one_line(program: str, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "DORA_ZENOH_CONFIG_OVERLAY": "zenoh-lossless.json5",  # as the README once said, relative
        "OPENAI_STREAM_SERVER_STORE": "memory",  # the server checks its store first: nothing to create here
    }
    env.pop("DORA_NODE_CONFIG", None)
    result = subprocess.run(
        [str(BIN_DIR / program)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90, check=False
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1, result.stderr
    expected = f"{program}: error: DORA_ZENOH_CONFIG_OVERLAY names the zenoh config overlay 'zenoh-lossless.json5'"
    assert lines[0].startswith(expected)
    assert str(tmp_path) in lines[0] and '--zenoh-config-overlay "$PWD/zenoh-lossless.json5"' in lines[0]
