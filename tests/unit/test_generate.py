"""``openai-stream-server dataflow``: the N x M layout of several server processes (docs/architecture.md, "Several server
processes"), and the shipped ``dataflow-frontdoor.yml`` is exactly what it writes."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from openai_stream_server.frontdoor import per_server_replicas
from openai_stream_server.generate import parse, render
from openai_stream_server.main import main
from openai_stream_server.replicas import discover

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "dataflow-frontdoor.yml"


def generated(*args: str) -> dict[str, Any]:
    layout, _ = parse(list(args))
    return dict(yaml.safe_load(render(layout)))


def node(spec: dict[str, Any], node_id: str) -> dict[str, Any]:
    return next(n for n in spec["nodes"] if n["id"] == node_id)


def header_command(text: str) -> list[str]:
    """The generator's arguments as the file's header states them."""
    line = next(line for line in text.splitlines() if line.startswith("#   openai-stream-server dataflow "))
    assert line.endswith(" -o <this file>")
    return shlex.split(line.removeprefix("#").removesuffix(" -o <this file>"))[2:]


def test_the_shipped_frontdoor_dataflow_is_the_generators_output() -> None:
    text = SHIPPED.read_text()
    args = header_command(text)
    assert args[:4] == ["--servers", "2", "--replicas", "3"] and "--store" in args
    layout, _ = parse(args)
    assert render(layout) == text, "dataflow-frontdoor.yml was edited by hand: write it again with the command in its header"
    spec = yaml.safe_load(text)
    servers = [n for n in spec["nodes"] if n["path"] == "openai-stream-server"]
    replicas = [n for n in spec["nodes"] if n["path"] == "echo-stream"]
    assert len(servers) == 2 and len(replicas) == 3
    assert all(n["env"]["OPENAI_STREAM_SERVER_STORE"].startswith("redis://") for n in servers)


def test_dora_validates_the_frontdoor_dataflow() -> None:
    dora = Path(sys.executable).parent / "dora"
    done = subprocess.run([str(dora), "validate", SHIPPED.name], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("servers, replicas", [(1, 1), (2, 3), (4, 2)])
def test_each_server_sees_every_replica_answering_it_on_its_own_output(servers: int, replicas: int) -> None:
    spec = generated("--servers", str(servers), "--replicas", str(replicas))
    server_ids = [f"openai-stream-server-{i}" for i in range(1, servers + 1)]
    replica_ids = [f"echo-stream-{i}" for i in range(1, replicas + 1)]
    assert [n["id"] for n in spec["nodes"]] == server_ids + replica_ids
    for server in server_ids:
        config = {k: node(spec, server)[k] for k in ("inputs", "outputs")}
        found = discover(config)
        assert [r.replica_id for r in found] == replica_ids
        assert all(r.cancel_output == f"cancel/{r.replica_id}" for r in found)
        assert per_server_replicas(config, server) == set(replica_ids)
        assert node(spec, server)["env"]["OPENAI_STREAM_SERVER_REUSE_PORT"] == "true"
    for replica in replica_ids:
        n = node(spec, replica)
        assert n["outputs"] == [f"chunks/{s}" for s in server_ids]
        sources = {k: v["source"] for k, v in n["inputs"].items()}
        assert sources == {
            **{f"v1/chat/completions/{s}": f"{s}/v1/chat/completions/{replica}" for s in server_ids},
            **{f"cancel/{s}": f"{s}/cancel/{replica}" for s in server_ids},
        }
        assert all(v["queue_policy"] == "backpressure" for v in n["inputs"].values())


def test_separate_ports_give_each_server_its_own_port_without_reuse_port() -> None:
    spec = generated("--servers", "3", "--replicas", "1", "--separate-ports", "9100", "--host", "0.0.0.0")
    envs = [node(spec, f"openai-stream-server-{i}")["env"] for i in (1, 2, 3)]
    assert [e["OPENAI_STREAM_SERVER_PORT"] for e in envs] == ["9100", "9101", "9102"]
    assert all("OPENAI_STREAM_SERVER_REUSE_PORT" not in e and e["OPENAI_STREAM_SERVER_HOST"] == "0.0.0.0" for e in envs)


def test_another_node_with_its_env_build_and_chunk_output() -> None:
    spec = generated(
        "--servers", "2", "--replicas", "2", "--node", "nodes/my_model.py", "--node-build", "pip install -e protocol -e my",
        "--node-env", "MODEL=qwen:7b", "--node-env", "DEBUG=true", "--chunk-output", "text", "--server-env", "X=1",
        "--restart-policy", "never",
    )  # fmt: skip
    replica = node(spec, "my-model-1")
    assert replica["path"] == "nodes/my_model.py" and replica["build"] == "pip install -e protocol -e my"
    assert replica["env"] == {"MODEL": "qwen:7b", "DEBUG": "true"}  # strings, as written
    assert replica["outputs"] == ["text/openai-stream-server-1", "text/openai-stream-server-2"]
    assert replica["restart_policy"] == "never" and "max_restarts" not in replica
    server = node(spec, "openai-stream-server-2")
    assert server["inputs"]["text/my-model-2"]["source"] == "my-model-2/text/openai-stream-server-2"
    assert server["env"]["X"] == "1"


def test_the_subcommand_writes_the_file_and_warns_of_a_store_that_is_not_shared(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "flow.yml"
    main(["dataflow", "--servers", "2", "--replicas", "1", "--store", "sqlite", "-o", str(out)])
    text = out.read_text()
    assert header_command(text) == ["--servers", "2", "--replicas", "1", "--store", "sqlite"]
    assert "is not shared" in capsys.readouterr().err
    main(["dataflow", "--servers", "1", "--replicas", "1"])
    printed = capsys.readouterr()
    assert printed.out.startswith("# 1 server processes x 1 replicas") and printed.err == ""


@pytest.mark.parametrize(
    "args, message",
    [
        (["--servers", "0"], "at least 1"),
        (["--port", "1", "--separate-ports", "2"], "exclude each other"),
        (["--node-env", "NOEQUALS"], "KEY=VALUE"),
    ],
)
def test_bad_arguments_stop_with_a_message(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse(args)
    assert exited.value.code == 2 and message in capsys.readouterr().err
