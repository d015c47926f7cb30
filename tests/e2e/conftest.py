"""Fixtures that start the real dataflow with ``dora run`` (see ``tests/dataflow.py``)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.dataflow import ROOT, Dataflow


@pytest.fixture(scope="module")
def echo_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """``dataflow-stream.yml`` as shipped (server + echo_stream), on a free port."""
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("echo-flow")) as flow:
        yield flow


@pytest.fixture(scope="module")
def fast_echo_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    """The same dataflow with echo at 0 delay, for many-stream tests."""
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0"}}
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("fast-echo-flow"), env=env) as flow:
        yield flow
