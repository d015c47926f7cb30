"""/v1/responses through the official openai SDK against the real ``dora run dataflow-stream.yml``.

One module-scoped flow with a paced echo (0.05 s a token) that logs every cancel it acts on,
so that a background response is still streaming when a test drops or cancels it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest
from openai.types.responses import ResponseStreamEvent

from openai_stream_protocol import split_tokens
from openai_stream_protocol.testing import wait_until
from tests.dataflow import ROOT, Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROMPT = "Stream me back,  word by word:\n exactly as  sent. "
# 80 tokens at 0.05 s: 4 s of answer, so a drop or cancel after a few deltas lands mid-answer.
LONG = " ".join(f"word{i}" for i in range(80)) + " the end."
HEAD = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added"]
TAIL = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]


@pytest.fixture(scope="module")
def responses_flow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dataflow]:
    env = {"echo-stream": {"ECHO_TOKEN_DELAY_S": "0.05", "ECHO_LOG_LEVEL": "DEBUG"}}
    with Dataflow(ROOT / "dataflow-stream.yml", tmp_path_factory.mktemp("responses-flow"), env=env) as flow:
        yield flow


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def deltas(events: list[ResponseStreamEvent]) -> str:
    return "".join(e.delta for e in events if e.type == "response.output_text.delta")


def check_order(events: list[ResponseStreamEvent], terminal: str = "response.completed") -> None:
    types = [e.type for e in events]
    n = types.count("response.output_text.delta")
    assert types == HEAD + ["response.output_text.delta"] * n + TAIL + [terminal]
    assert [e.sequence_number for e in events] == list(range(len(events)))


def test_create_stream_events_and_text(responses_flow: Dataflow) -> None:
    events = list(sdk(responses_flow).responses.create(model="m", input=PROMPT, stream=True))
    check_order(events)
    assert deltas(events) == PROMPT
    assert sum(1 for e in events if e.type == "response.output_text.delta") >= len(split_tokens(PROMPT))  # one per chunk
    final = events[-1]
    assert final.type == "response.completed" and final.response.output_text == PROMPT
    assert final.response.id.startswith("resp_") and final.response.status == "completed" and final.response.model == "m"
    assert final.response.usage is not None and final.response.usage.output_tokens == len(split_tokens(PROMPT))


def test_stream_helper_gives_the_final_response(responses_flow: Dataflow) -> None:
    with sdk(responses_flow).responses.stream(model="m", input=PROMPT, instructions="be exact") as stream:
        text = "".join(e.delta for e in stream if e.type == "response.output_text.delta")
        final = stream.get_final_response()
    assert text == PROMPT and final.output_text == PROMPT
    assert final.status == "completed" and final.instructions == "be exact"


def test_background_drop_and_resume_gives_exactly_the_rest(responses_flow: Dataflow) -> None:
    client = sdk(responses_flow)
    stream = client.responses.create(model="m", input=LONG, stream=True, background=True)
    before: list[ResponseStreamEvent] = []
    for event in stream:
        before.append(event)
        if sum(1 for e in before if e.type == "response.output_text.delta") == 5:
            break
    stream.close()  # drops the connection mid-answer
    response_id = before[0].response.id  # type: ignore[union-attr]
    last = before[-1].sequence_number
    assert before[0].response.status == "queued" and last == 8  # type: ignore[union-attr]
    assert client.responses.retrieve(response_id).status in ("in_progress", "completed")  # dropping never cancels
    after = list(client.responses.retrieve(response_id, stream=True, starting_after=last))
    assert [e.sequence_number for e in after] == list(range(last + 1, last + 1 + len(after)))
    check_order(before + after)
    assert deltas(before) + deltas(after) == LONG and len(deltas(after)) > len(deltas(before))
    # A replay from the start is the same events with the same numbers.
    replay = list(client.responses.retrieve(response_id, stream=True))
    assert [e.to_dict() for e in replay] == [e.to_dict() for e in before + after]


def test_background_cancel_stops_the_node(responses_flow: Dataflow) -> None:
    client = sdk(responses_flow)
    created = client.responses.create(model="m", input=LONG, background=True)
    assert created.status in ("queued", "in_progress") and created.background is True
    wait_until(lambda: client.responses.retrieve(created.id).output_text, 20, interval_s=0.05, what="text (the node started)")
    cancelled = client.responses.cancel(created.id)
    assert cancelled.status == "cancelled"
    log, line = responses_flow.log_path, f"request {created.id} cancelled"
    wait_until(lambda: line in log.read_text(errors="replace"), 10, interval_s=0.05, what="the node to log the cancel")
    got = client.responses.retrieve(created.id)
    assert got.status == "cancelled" and LONG.startswith(got.output_text) and got.output_text != LONG
    events = list(client.responses.retrieve(created.id, stream=True))
    check_order(events, "response.failed")  # no response.cancelled event exists: failed, with status cancelled
    assert events[-1].response.status == "cancelled"  # type: ignore[union-attr]


def test_image_part_reaches_the_node_as_an_image(responses_flow: Dataflow) -> None:
    response = sdk(responses_flow).responses.create(
        model="m",
        input=[
            {
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "look"},
                    {"type": "input_image", "image_url": "https://example.com/cat.png", "detail": "auto"},
                    {"type": "input_text", "text": "here"},
                ],
            }
        ],
    )
    # echo_stream answers the user turn's text parts and counts only non-image parts as prompt tokens:
    # an image that arrived as text would show in the answer and add a token.
    assert response.output_text == "look\nhere"
    assert response.usage is not None and response.usage.input_tokens == 2


def test_previous_response_id_chains_the_conversation(responses_flow: Dataflow) -> None:
    client = sdk(responses_flow)
    first = client.responses.create(model="m", input="alpha beta")
    second = client.responses.create(model="m", input="gamma", previous_response_id=first.id)
    assert first.output_text == "alpha beta" and second.output_text == "gamma"
    assert second.previous_response_id == first.id
    # The node counted the whole conversation: user "alpha beta", assistant "alpha beta", user "gamma".
    assert first.usage is not None and second.usage is not None
    assert (first.usage.input_tokens, second.usage.input_tokens) == (2, 5)


def test_non_stream_retrieve_delete_and_bad_requests(responses_flow: Dataflow) -> None:
    client = sdk(responses_flow)
    created = client.responses.create(model="m", input=PROMPT, metadata={"ticket": "42"}, max_output_tokens=3)
    assert created.status == "incomplete" and created.incomplete_details is not None
    assert created.incomplete_details.reason == "max_output_tokens"
    assert created.output_text == "".join(split_tokens(PROMPT)[:3]) and created.metadata == {"ticket": "42"}
    got = client.responses.retrieve(created.id)
    assert got.to_dict() == created.to_dict()
    assert client.responses.delete(created.id) is None
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(created.id)
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="m", input="x", previous_response_id=created.id)
    assert missing.value.param == "previous_response_id"  # type: ignore[attr-defined]
    bad = [
        ({"input": []}, "input"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
        ({"input": "x", "background": True, "store": False}, "store"),
        ({"input": "x", "temperature": 7}, "temperature"),
    ]
    for kwargs, param in bad:
        with pytest.raises(openai.BadRequestError) as error:
            client.responses.create(model="m", **kwargs)  # type: ignore[call-overload]
        assert error.value.param == param, (kwargs, error.value)  # type: ignore[attr-defined]
    assert re.fullmatch(r"resp_[0-9a-f]+", created.id)
