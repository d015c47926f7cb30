"""The shipped flows that span machines, and every flow with a restart policy (docs/deploy.md, "Several machines").

Across machines the echo replicas send step batches, each replica has its ``resend`` input wired to
the server's ``resend/<replica>`` output, and every node dora restarts is restarted with a growing
delay and a limit: a node that dies at once is not restarted in a tight loop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
SERVER = "openai-stream-server"
CLUSTER_FLOWS = ["dataflow-cluster.yml", "qwenvl-cluster.yml"]
RESTARTING = sorted(p.name for p in ROOT.glob("*.yml") if "restart_policy" in p.read_text())


def nodes(name: str) -> dict[str, dict[str, Any]]:
    return {node["id"]: node for node in yaml.safe_load((ROOT / name).read_text())["nodes"]}


def test_the_flows_with_restart_policies_are_the_expected_ones() -> None:
    assert {"dataflow-replicas.yml", *CLUSTER_FLOWS} <= set(RESTARTING)


@pytest.mark.parametrize("name", RESTARTING)
def test_every_restarted_node_has_a_limit_a_window_and_a_growing_delay(name: str) -> None:
    restarted = [node for node in nodes(name).values() if node.get("restart_policy", "never") != "never"]
    assert restarted
    for node in restarted:
        assert 1 <= node["max_restarts"] <= 10, node["id"]  # 0 would mean no limit
        assert node["restart_window"] >= 60, node["id"]
        assert 0 < node["restart_delay"] < node["max_restart_delay"], node["id"]


@pytest.mark.parametrize("name", CLUSTER_FLOWS)
def test_each_replica_takes_resend_asks_from_its_own_server_output(name: str) -> None:
    flow = nodes(name)
    server = flow.pop(SERVER)
    assert flow
    for rid, replica in flow.items():
        assert replica["inputs"]["resend"]["source"] == f"{SERVER}/resend/{rid}"
        assert replica["inputs"]["resend"]["queue_policy"] == "backpressure"
        assert f"resend/{rid}" in server["outputs"]


def test_the_echo_replicas_across_machines_send_step_batches() -> None:
    """One message per token from one machine overflows dora 1.1's inter-daemon channel (the cliff)."""
    flow = nodes("dataflow-cluster.yml")
    replicas = [node for rid, node in flow.items() if rid != SERVER]
    assert len(replicas) == 2
    for replica in replicas:
        assert float(replica["env"]["ECHO_STEP_MS"]) > 0 and "ECHO_TOKEN_DELAY_S" not in replica["env"]
        assert replica["deploy"]["machine"] != flow[SERVER]["deploy"]["machine"]


@pytest.mark.parametrize("name", CLUSTER_FLOWS)
def test_the_header_gives_the_overlay_as_an_absolute_path(name: str) -> None:
    header = [line for line in (ROOT / name).read_text().splitlines() if "--zenoh-config-overlay" in line]
    assert header and all('--zenoh-config-overlay "$PWD/zenoh-lossless.json5"' in line for line in header)
