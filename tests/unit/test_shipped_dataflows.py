"""The dataflow YAMLs and node manifests the project ships: port, host and build lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted([*ROOT.glob("*.yml"), *ROOT.glob("benchmarks/dataflows/*.yml")])
MANIFESTS = sorted(ROOT.glob("nodes/*/dora-node.yml"))


def nodes_of(path: Path) -> list[dict[str, Any]]:
    spec = yaml.safe_load(path.read_text())
    if path.name == "dora-node.yml":
        return list(yaml.safe_load(spec["example"]))
    return list(spec["nodes"])


def test_there_is_something_to_check() -> None:
    names = {path.name for path in SHIPPED}
    assert {"dataflow-stream.yml", "dataflow-replicas.yml", "dataflow-cluster.yml", "qwenvl.yml", "qwenvl-cluster.yml"} <= names
    assert len(MANIFESTS) == 2


@pytest.mark.parametrize("path", [*SHIPPED, *MANIFESTS], ids=lambda p: str(p.relative_to(ROOT)))
def test_no_node_env_pins_the_servers_address(path: Path) -> None:
    """A node's ``env:`` overrides the environment of ``dora run``: a port written there cannot be changed."""
    for node in nodes_of(path):
        env = node.get("env") or {}
        assert not {"OPENAI_STREAM_SERVER_PORT", "OPENAI_STREAM_SERVER_HOST"} & set(env), (path.name, node["id"])


@pytest.mark.parametrize("path", [*SHIPPED, *MANIFESTS], ids=lambda p: str(p.relative_to(ROOT)))
def test_every_build_line_installs_the_protocol_in_the_same_command(path: Path) -> None:
    """openai-stream-protocol is not on PyPI: pip finds it only when it is named in the same command."""
    builds = [node["build"] for node in nodes_of(path) if "build" in node]
    if path.name == "dora-node.yml":
        builds.append(yaml.safe_load(path.read_text())["build"])
    for build in builds:
        assert build.startswith("pip install "), build
        assert "-e protocol " in build or "-e ../../protocol " in build, build


@pytest.mark.parametrize("name", ["dataflow-replicas.yml", "dataflow-cluster.yml"])
def test_dora_validates_the_replica_dataflows(name: str) -> None:
    """Output ids with a replica's node id in them (``v1/chat/completions/<id>``) are fine with dora."""
    dora = Path(sys.executable).parent / "dora"
    result = subprocess.run([str(dora), "validate", name], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
