"""``dora run qwenvl.yml`` (server + qwenvl_stream) on the tiny model, driven by the openai SDK.

The YAML is the shipped one, copied by the e2e harness with a free port and
``MODEL_NAME_OR_PATH`` pointing at the tiny model built for this session.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
import yaml
from qwenvl_helpers import png_data_uri

from openai_stream_protocol.testing import wait_for
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

QWENVL_YML = ROOT / "qwenvl.yml"
MODEL_NODE = "qwenvl-stream"


def served_model_name() -> str:
    spec = yaml.safe_load(QWENVL_YML.read_text())
    server = next(node for node in spec["nodes"] if node["id"] == "openai-stream-server")
    return str(server["env"]["OPENAI_STREAM_SERVER_MODEL"])


MODEL = served_model_name()


@pytest.fixture(scope="module")
def qwen_flow(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Iterator[Dataflow]:
    env = {MODEL_NODE: {"MODEL_NAME_OR_PATH": str(tiny_model_dir), "HF_HUB_OFFLINE": "1"}}
    with Dataflow(QWENVL_YML, tmp_path_factory.mktemp("qwenvl-flow"), env=env, ready_timeout_s=120) as flow:
        yield flow


def client(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="x", max_retries=0, timeout=60)


def stream(flow: Dataflow, messages: Any, **kwargs: Any) -> list[Any]:
    return list(
        client(flow).chat.completions.create(
            model=MODEL, messages=messages, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )


def content_of(chunks: list[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


def finish_reasons(chunks: list[Any]) -> list[str]:
    return [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]


def test_a_streaming_request_gets_several_chunks_and_a_finish_reason(qwen_flow: Dataflow) -> None:
    chunks = stream(
        qwen_flow,
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}],
        max_tokens=60,
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(content_of(chunks)) >= 2
    assert len(finish_reasons(chunks)) == 1 and finish_reasons(chunks)[0] in ("stop", "length")
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 60


def test_a_png_data_uri_goes_through_the_vision_path(qwen_flow: Dataflow) -> None:
    question = {"type": "text", "text": "What is in this picture?"}
    image = {"type": "image_url", "image_url": {"url": png_data_uri((60, 40))}}
    with_image = stream(qwen_flow, [{"role": "user", "content": [image, question]}], max_tokens=8)
    text_only = stream(qwen_flow, [{"role": "user", "content": [question]}], max_tokens=8)
    assert finish_reasons(with_image)[0] in ("stop", "length")
    # 60x40 resizes to 56x28: 2 merged image tokens, plus vision start and end (the model node's count).
    assert with_image[-1].usage.prompt_tokens - text_only[-1].usage.prompt_tokens == 2 + 2


def test_max_tokens_gives_length(qwen_flow: Dataflow) -> None:
    chunks = stream(qwen_flow, [{"role": "user", "content": "Count to ten"}], max_tokens=5)
    assert finish_reasons(chunks) == ["length"]
    assert chunks[-1].usage.completion_tokens == 5


def test_a_disconnect_mid_generation_stops_the_generation(qwen_flow: Dataflow) -> None:
    max_tokens = 1900
    response = client(qwen_flow).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Go on forever"}], stream=True, max_tokens=max_tokens
    )
    completion_id = None
    for chunk in response:
        completion_id = chunk.id
        if chunk.choices and chunk.choices[0].delta.content:
            break
    response.close()
    assert completion_id is not None
    pattern = re.compile(rf"request {re.escape(completion_id)}: (?:cancelled after (\d+) of|finish_reason=)")

    def logged() -> re.Match[str] | None:
        return pattern.search(qwen_flow.log_path.read_text(errors="replace"))

    assert wait_for(lambda: logged() is not None, 60, interval_s=0.2), qwen_flow.log()
    match = logged()
    assert match is not None
    assert match.group(1) is not None, f"the generation ran to its end: {match.group(0)}"
    assert int(match.group(1)) < max_tokens


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_broken_image_url_yields_an_error_and_the_node_keeps_serving(qwen_flow: Dataflow) -> None:
    image: Any = {"type": "image_url", "image_url": {"url": f"http://127.0.0.1:{closed_port()}/missing.png"}}
    with pytest.raises(openai.APIError) as info:
        for _ in client(qwen_flow).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": [image, {"type": "text", "text": "?"}]}], stream=True
        ):
            pass
    assert "image URL not allowed" in str(info.value)  # loopback: refused before any connection
    chunks = stream(qwen_flow, [{"role": "user", "content": "Still there?"}], max_tokens=5)
    assert finish_reasons(chunks) == ["length"]


def test_a_non_streaming_request_gets_the_whole_answer(qwen_flow: Dataflow) -> None:
    completion = client(qwen_flow).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hello"}], max_tokens=12
    )
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.completion_tokens <= 12
