"""The API key: an empty one given explicitly stops the server at start-up; the ``Bearer`` scheme is case-insensitive."""

from __future__ import annotations

import pytest

from openai_stream_server.main import main
from openai_stream_server.settings import Settings, load_settings
from tests.unit.conftest import make_client


@pytest.mark.parametrize(
    "argv, environ, named",
    [
        pytest.param([], {"OPENAI_STREAM_SERVER_API_KEY": ""}, "OPENAI_STREAM_SERVER_API_KEY", id="empty-env"),
        pytest.param(["--api-key", ""], {}, "--api-key", id="empty-flag"),
        pytest.param(["--api-key="], {}, "--api-key", id="empty-flag-equals"),
        pytest.param([], {"OPENAI_STREAM_SERVER_API_KEY": "  "}, "OPENAI_STREAM_SERVER_API_KEY", id="blank-env"),
        pytest.param(["--api-key", ""], {"OPENAI_STREAM_SERVER_API_KEY": "s3cret"}, "--api-key", id="flag-wins-and-is-empty"),
    ],
)
def test_an_empty_api_key_given_explicitly_stops_the_server_with_one_line_naming_it(
    argv: list[str], environ: dict[str, str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        load_settings(["--host", "0.0.0.0", *argv], environ)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and named in err and "empty" in err


def test_main_refuses_an_empty_key_before_it_starts_anything(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("OPENAI_STREAM_SERVER_API_KEY", "")
    with pytest.raises(SystemExit) as exited:
        main(["--host", "0.0.0.0"])  # would bind and need a dataflow if it went on
    assert exited.value.code == 2 and "OPENAI_STREAM_SERVER_API_KEY is empty" in capsys.readouterr().err


def test_no_api_key_at_all_still_means_no_key_check() -> None:
    assert load_settings([], {}).api_key is None
    assert load_settings([], {"OPENAI_STREAM_SERVER_API_KEY": "s3cret"}).api_key == "s3cret"


def test_settings_built_in_code_refuse_an_empty_key_too() -> None:
    with pytest.raises(ValueError, match="api_key is empty"):
        Settings(api_key="")


@pytest.mark.parametrize(
    "authorization, status",
    [
        pytest.param("Bearer s3cret", 200, id="Bearer"),
        pytest.param("bearer s3cret", 200, id="bearer"),
        pytest.param("BEARER s3cret", 200, id="BEARER"),
        pytest.param("bearer  s3cret", 200, id="two-spaces"),
        pytest.param("bearer wrong", 401, id="wrong-key"),
        pytest.param("Basic s3cret", 401, id="other-scheme"),
        pytest.param("s3cret", 401, id="no-scheme"),
        pytest.param("bearers3cret", 401, id="no-space"),
        pytest.param("bearer ", 401, id="no-key"),
    ],
)
async def test_the_bearer_scheme_is_case_insensitive(authorization: str, status: int) -> None:
    async with make_client(Settings(api_key="s3cret", sweep_interval_s=0.02)) as (client, _):
        response = await client.get("/v1/models", headers={"authorization": authorization})
    assert response.status_code == status, response.text
