"""The zenoh overlay check nodes run before ``Node()``: one line and a non-zero exit for a path that is not a file."""

from __future__ import annotations

from pathlib import Path

import pytest

from openai_stream_protocol import ZENOH_OVERLAY_ENV, check_zenoh_overlay, zenoh_overlay_problem


def test_unset_or_an_existing_file_is_fine(tmp_path: Path) -> None:
    overlay = tmp_path / "zenoh.json5"
    overlay.write_text("{}")
    assert zenoh_overlay_problem({}) is None
    assert zenoh_overlay_problem({ZENOH_OVERLAY_ENV: ""}) is None
    assert zenoh_overlay_problem({ZENOH_OVERLAY_ENV: str(overlay)}) is None
    assert zenoh_overlay_problem({ZENOH_OVERLAY_ENV: "zenoh.json5"}, cwd=str(tmp_path)) is None


def test_a_relative_path_that_does_not_resolve_here_says_what_to_do(tmp_path: Path) -> None:
    problem = zenoh_overlay_problem({ZENOH_OVERLAY_ENV: "zenoh-lossless.json5"}, cwd=str(tmp_path))
    assert problem is not None and "\n" not in problem
    assert "'zenoh-lossless.json5'" in problem and str(tmp_path) in problem
    assert '--zenoh-config-overlay "$PWD/zenoh-lossless.json5"' in problem


def test_check_exits_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        check_zenoh_overlay("echo-stream", {ZENOH_OVERLAY_ENV: str(tmp_path / "missing.json5")})
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("echo-stream: error: DORA_ZENOH_CONFIG_OVERLAY names ")
