"""Lost chunks asked for again, under ``dora run`` (docs/architecture.md, "Resend").

``dataflow-replicas.yml`` with its three echo replicas in per-token mode, each losing every
``DROP_EVERY``-th chunk message on purpose (``ECHO_DROP_EVERY``): two replicas have a ``resend``
input (wired to the server's ``resend/<replica>`` output), the third has none and so keeps the
behaviour before resends. 200 concurrent streams: every stream on a replica that resends comes
back word for word; one on the other replica that lost a chunk ends cleanly (an error event naming
``missing_chunk`` or the idle timeout, then ``[DONE]``, after the text before the hole), never hangs.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.dataflow import ROOT, Dataflow
from tests.e2e.test_failover import Stream, stream, words
from tests.live import metric

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

SERVER = "openai-stream-server"
RESENDING = ["echo-stream-1", "echo-stream-2"]
WITHOUT = "echo-stream-3"
DROP_EVERY = 37
STREAMS = 200


def with_resend(spec: dict[str, Any]) -> dict[str, Any]:
    """The replicas in ``RESENDING`` get a ``resend`` input from the server's ``resend/<replica>`` output."""
    nodes = {node["id"]: node for node in spec["nodes"]}
    for rid in RESENDING:
        nodes[SERVER]["outputs"].append(f"resend/{rid}")
        source = {"source": f"{SERVER}/resend/{rid}", "queue_size": 100000, "queue_policy": "backpressure"}
        nodes[rid]["inputs"]["resend"] = source
    return spec


@pytest.fixture(scope="module")
def flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    env: dict[str, dict[str, Any]] = {
        rid: {"ECHO_TOKEN_DELAY_S": "0.05", "ECHO_DROP_EVERY": str(DROP_EVERY)} for rid in [*RESENDING, WITHOUT]
    }
    # Without heartbeats the replica without resend is never judged by its silence: once idle, a replica that
    # sends them and still holds a stream with a hole would have it continued elsewhere (docs/architecture.md,
    # "Failover"), which is not what this test looks at. Its lost last chunks end on the idle timeout: short here.
    env[WITHOUT]["ECHO_HEARTBEAT_S"] = "0"
    env[SERVER] = {"OPENAI_STREAM_SERVER_IDLE_TIMEOUT_S": "8"}  # past the gap timeout (5 s), which ends a hole
    with Dataflow(ROOT / "dataflow-replicas.yml", tmp_path_factory.mktemp("resend"), env=env, transform=with_resend) as flow:
        yield flow


def test_200_per_token_streams_with_lost_chunks_come_back_whole_where_the_replica_resends(flow: Dataflow) -> None:
    async def run() -> tuple[list[Stream], dict[str, Any], str]:
        limits = httpx.Limits(max_connections=STREAMS + 10)
        async with httpx.AsyncClient(base_url=flow.base_url, timeout=60, limits=limits) as client:
            streams = [Stream(words(i)) for i in range(STREAMS)]
            await asyncio.wait_for(asyncio.gather(*(stream(client, s) for s in streams)), 120)
            return streams, (await client.get("/health")).json(), (await client.get("/metrics")).text

    streams, health, metrics = asyncio.run(run())
    served = {r["id"]: r["served"] for r in health["replicas"]}
    exact = [s for s in streams if s.exact]
    broken = [s for s in streams if not s.exact]
    # Every stream ended (no hang): exact, or cut cleanly at a hole of the replica without resend.
    for s in broken:
        assert s.done and [e.get("code") for e in s.errors] in (["missing_chunk"], ["upstream_timeout"]), (s.errors, s.got)
        assert s.text.startswith(s.got) and s.finishes == []
    # Every completed stream is exact, and every stream of the replicas that resend completed.
    assert len(exact) == sum(served.values()), (served, len(exact))
    assert sum(served[r] for r in RESENDING) >= STREAMS // 2  # routing spreads the streams: about 2 in 3 went there
    assert broken, "the replica without resend lost no chunk: the test did not lose anything"
    assert served[WITHOUT] + len(broken) <= STREAMS - sum(served[r] for r in RESENDING)
    assert metric(metrics, "oss_resends_served_total") >= 1 and metric(metrics, "oss_resends_failed_total") == 0
    assert metric(metrics, "oss_resends_requested_total") >= metric(metrics, "oss_resends_served_total")
    assert health["status"] == "degraded" and health["chunk_loss"]["gaps_last_minute"] >= 1
