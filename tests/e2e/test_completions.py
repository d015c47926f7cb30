"""/v1/completions with the official openai SDK against the real ``dora run dataflow-stream.yml``."""

from __future__ import annotations

import openai
import pytest

from tests.dataflow import Dataflow

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

PROMPT = "Complete me back,  word by word:\n exactly as  sent. "


def sdk(flow: Dataflow) -> openai.OpenAI:
    return openai.OpenAI(base_url=flow.base_url + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_sdk_stream_with_usage(echo_flow: Dataflow) -> None:
    stream = sdk(echo_flow).completions.create(
        model="gpt-3.5-turbo-instruct", prompt=PROMPT, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    texts = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].text for c in texts) == PROMPT
    assert [c.choices[0].finish_reason for c in texts][-1] == "stop"
    assert len(texts) > 3  # the echo paces its tokens, so they arrive as several events
    assert {c.object for c in chunks} == {"text_completion"} and {c.model for c in chunks} == {"gpt-3.5-turbo-instruct"}
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("cmpl-")
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert usage.completion_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_sdk_non_stream_and_max_tokens(echo_flow: Dataflow) -> None:
    client = sdk(echo_flow)
    whole = client.completions.create(model="m", prompt=[PROMPT])
    cut = client.completions.create(model="m", prompt="one two three four five", max_tokens=2)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    assert whole.choices[0].text == PROMPT and whole.choices[0].finish_reason == "stop"
    assert whole.usage is not None and whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0
    assert cut.choices[0].text == "one two" and cut.choices[0].finish_reason == "length"


@pytest.mark.parametrize(
    "extra, param",
    [
        pytest.param({"prompt": [1, 2, 3]}, "prompt", id="token-array"),
        pytest.param({"prompt": ["a", "b"]}, "prompt", id="two-prompts"),
        pytest.param({"prompt": "hi", "echo": True}, "echo", id="echo"),
        pytest.param({"prompt": "hi", "logprobs": 1}, "logprobs", id="logprobs"),
    ],
)
def test_sdk_bad_input_is_a_bad_request_naming_the_param(echo_flow: Dataflow, extra: dict[str, object], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        sdk(echo_flow).completions.create(model="m", **extra)  # type: ignore[call-overload]
    assert refused.value.status_code == 400 and refused.value.param == param
