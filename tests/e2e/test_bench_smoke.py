"""The benchmark harness end to end, with small numbers: it runs, and integrity is exact.

Never asserts a speed: the figures depend on the machine and on whatever
else runs on it. ``python -m benchmarks.run --mode smoke`` starts the relay
ceiling, the SSE ceiling, the server at 0 delay (burst, time to first chunk,
request rate), the server paced at 30 tokens/s, echo_stream in step mode
(the batch form: burst and paced) and the idle-memory run, and stops each of
them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dataflow import ROOT

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def test_bench_smoke_runs_and_integrity_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "benchmarks.run", "--mode", "smoke", "--no-seed", "--json", str(out)]
    if importlib.util.find_spec("matplotlib") is not None:
        command += ["--plot", str(tmp_path / "smoke.png")]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    document = json.loads(out.read_text())
    (run,) = document["runs"]
    assert set(run) == {"relay", "sse", "server", "paced", "step", "idle"}

    integrities = [level["integrity"] for level in run["server"]["levels"]]
    integrities += [run["server"]["ttfc"]["integrity"], run["server"]["rate"]["integrity"], run["idle"]["integrity"]]
    integrities += [paced["integrity"] for paced in run["paced"]]
    integrities += [r["integrity"] for r in run["step"]["levels"] + run["step"]["paced"]]
    integrities += [level["integrity"] for level in run["sse"]["levels"]]
    for integrity in integrities:
        assert integrity["streams"] > 0
        assert integrity["exact"], integrity
        assert (integrity["lost"], integrity["duplicated"], integrity["crossed"], integrity["failed"]) == (0, 0, 0, 0)
    for level in run["relay"]["levels"]:
        assert level["chunks"] > 0 and level["bad_streams"] == 0 and level["crossed"] == 0
    summary = document["summaries"][0]
    assert summary["integrity_exact"] is True
    assert "Burst" in done.stdout and "integrity" in done.stdout
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "smoke.png").stat().st_size > 0
