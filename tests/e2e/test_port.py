"""The shipped ``dataflow-stream.yml`` serves on the port named in the environment of ``dora run``.

A node's ``env:`` overrides that environment (docs/architecture.md, "Facts measured"), so
the YAML must not name the port; this runs it with the port in the environment only.
"""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from tests.dataflow import ROOT, SERVER_NODE, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]


def test_the_port_comes_from_the_environment_of_dora_run(tmp_path: Path) -> None:
    flow = Dataflow(ROOT / "dataflow-stream.yml", tmp_path, port_from_environ=True)
    server = next(node for node in flow.descriptor()["nodes"] if node["id"] == SERVER_NODE)
    assert "OPENAI_STREAM_SERVER_PORT" not in (server.get("env") or {})
    with flow:
        body = {"model": "m", "messages": [{"role": "user", "content": "port from the environment"}]}
        response = httpx.post(f"{flow.base_url}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "port from the environment"


def test_a_port_taken_before_the_server_binds_it_is_retried_on_another(tmp_path: Path) -> None:
    """The test harness's own guard against the port race (tests/dataflow.py): a port free when chosen
    may be taken before the server binds it; the dataflow then starts again on another."""
    flow = Dataflow(ROOT / "dataflow-stream.yml", tmp_path)
    taken = flow.port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with flow:
            response = httpx.get(f"{flow.base_url}/health", timeout=10)
    assert flow.start_attempts == 2 and flow.port != taken
    assert response.status_code == 200
