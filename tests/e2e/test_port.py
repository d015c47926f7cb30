"""The shipped ``dataflow-stream.yml`` serves on the port named in the environment of ``dora run``.

A node's ``env:`` overrides that environment (docs/architecture.md, "Facts measured"), so
the YAML must not name the port; this runs it with the port in the environment only.
"""

from __future__ import annotations

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
