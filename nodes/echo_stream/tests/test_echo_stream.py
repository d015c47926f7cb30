from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest
from echo_stream.engine import EchoStream, ListSource
from echo_stream.main import main
from echo_stream.settings import Settings

from openai_stream_protocol import USER_TEXT_PREFIX, is_batch
from openai_stream_protocol.testing import RecordingNode

FAST = Settings(token_delay_s=0)


def check_wire(recorder: RecordingNode) -> RecordingNode:
    """Every message is a chunk in the string form (``pa.string()``, not ``large_string``) and none sets ``flush``."""
    assert all(sent.data.type == pa.string() and "flush" not in sent.metadata for sent in recorder.sent)
    return recorder


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def request(request_id: str, *texts: str, **metadata: Any) -> dict[str, Any]:
    meta = {"request_id": request_id, "session_id": request_id, "model": "echo", "stream": True, "max_tokens": 0, **metadata}
    return {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array(list(texts), type=pa.string()), "metadata": meta}


def user(text: str) -> str:
    return USER_TEXT_PREFIX + text


def cancel(request_id: str) -> dict[str, Any]:
    return {"type": "INPUT", "id": "cancel", "value": pa.array([request_id]), "metadata": {"request_id": request_id}}


def run(events: list[dict[str, Any]], settings: Settings = FAST) -> RecordingNode:
    recorder = RecordingNode()
    EchoStream(recorder, settings).run(events)
    return check_wire(recorder)


TRICKY = ["hello world", "  leading and trailing  ", "tabs\tand\nnew\n\nlines \n", "x", "   ", "ünï cödé 🙂 wörds", "a  b   c"]


@pytest.mark.parametrize("text", TRICKY)
def test_chunks_join_to_the_exact_text(text: str) -> None:
    recorder = run([request("r1", "<|system|>\nbe brief", user(text))])
    chunks = recorder.chunks("r1")
    assert recorder.text("r1") == text
    assert [chunk.seq for chunk in chunks] == list(range(len(chunks)))
    assert [chunk.fin for chunk in chunks] == [False] * (len(chunks) - 1) + [True]
    assert chunks[-1].finish_reason == "stop"
    assert {sent.output_id for sent in recorder.sent} == {"chunks"}


def test_echoes_the_last_user_turn_and_counts_tokens() -> None:
    texts = ["<|system|>\nbe brief", user("first question"), "<|assistant|>\nan answer", user("second"), user("part two")]
    recorder = run([request("r1", *texts)])
    last = recorder.chunks("r1")[-1]
    assert recorder.text("r1") == "second\npart two"
    assert last.prompt_tokens == 2 + 2 + 2 + 1 + 2
    assert last.completion_tokens == 3
    assert [chunk.text for chunk in recorder.chunks("r1")] == ["second", "\npart", " two"]


def test_metadata_carries_both_ids_and_no_prompt_counts_before_the_end() -> None:
    recorder = run([request("r1", user("a b c"))])
    metadatas = recorder.metadata()
    assert all(m["request_id"] == m["session_id"] == "r1" for m in metadatas)
    assert all("prompt_tokens" not in m and "fin" not in m for m in metadatas[:-1])
    assert metadatas[-1]["fin"] is True and "sent_at" not in metadatas[-1]


def test_empty_echo_is_one_fin_chunk() -> None:
    recorder = run([request("r1", "<|system|>\nonly a system prompt")])
    [chunk] = recorder.chunks("r1")
    assert (chunk.seq, chunk.text, chunk.fin, chunk.finish_reason, chunk.completion_tokens) == (0, "", True, "stop", 0)


@pytest.mark.parametrize(
    "max_tokens, text, reason",
    [
        pytest.param(2, "one two", "length", id="cut"),
        pytest.param(3, "one two three", "stop", id="exactly-the-limit"),
        pytest.param(4, "one two three", "stop", id="under-the-limit"),
        pytest.param(0, "one two three", "stop", id="zero-is-unlimited"),
        pytest.param(-1, "one two three", "stop", id="negative-is-unlimited"),
        pytest.param("None", "one two three", "stop", id="None-as-dora-sends-it"),
        pytest.param("2", "one two", "length", id="string-int"),
    ],
)
def test_max_tokens(max_tokens: Any, text: str, reason: str) -> None:
    recorder = run([request("r1", user("one two three"), max_tokens=max_tokens)])
    last = recorder.chunks("r1")[-1]
    assert recorder.text("r1") == text
    assert (last.finish_reason, last.completion_tokens) == (reason, len(text.split()))


def test_missing_max_tokens_is_unlimited() -> None:
    event = request("r1", user("one two three"))
    del event["metadata"]["max_tokens"]
    assert run([event]).text("r1") == "one two three"


def test_hub_spelling_of_the_request_input() -> None:
    event = {**request("r1", user("hi")), "id": "v1_chat_completions"}
    assert run([event]).text("r1") == "hi"


def test_stop_sequences_cut_the_answer() -> None:
    recorder = run([request("r1", user("keep this STOP not this END"), stop=["END", "STOP"])])
    assert recorder.text("r1") == "keep this "
    last = recorder.chunks("r1")[-1]
    assert (last.finish_reason, last.stop_sequence) == ("stop", "STOP")  # the one found first, not the first listed
    assert all(chunk.stop_sequence is None for chunk in recorder.chunks("r1")[:-1])


@pytest.mark.parametrize(
    "text, stop, expected_text, expected_stop",
    [
        pytest.param("one two STOP three", "STOP", "one two ", "STOP", id="a-string"),
        pytest.param("a XY b", ["XY", "X"], "a ", "X", id="same-place-the-shorter"),
        pytest.param("STOP at once", ["STOP"], "", "STOP", id="nothing-before-it"),
        pytest.param("no stop here", ["STOP"], "no stop here", None, id="not-found"),
        pytest.param("one STOP", [], "one STOP", None, id="no-stop-strings"),
    ],
)
def test_the_finish_names_the_stop_sequence_that_cut_the_echo(
    text: str, stop: Any, expected_text: str, expected_stop: str | None
) -> None:
    recorder = run([request("r1", user(text), stop=stop)])
    assert recorder.text("r1") == expected_text
    last = recorder.chunks("r1")[-1]
    assert (last.fin, last.finish_reason, last.stop_sequence) == (True, "stop", expected_stop)
    assert ("stop_sequence" in recorder.metadata()[-1]) is (expected_stop is not None)


def test_max_tokens_before_the_stop_sequence_is_length_without_one() -> None:
    recorder = run([request("r1", user("one two three STOP four"), stop=["STOP"], max_tokens=2)])
    last = recorder.chunks("r1")[-1]
    assert (recorder.text("r1"), last.finish_reason, last.stop_sequence) == ("one two", "length", None)


def test_a_non_streaming_answer_names_its_stop_sequence_too() -> None:
    recorder = run([request("r1", user("one two STOP three"), stop=["STOP"], stream=False)])
    assert [(c.text, c.fin, c.stop_sequence) for c in recorder.chunks("r1")] == [("one two ", True, "STOP")]


@pytest.mark.parametrize("per_chunk, expected", [(2, ["a b", " c d", " e"]), (5, ["a b c d e"]), (9, ["a b c d e"])])
def test_tokens_per_chunk(per_chunk: int, expected: list[str]) -> None:
    recorder = run([request("r1", user("a b c d e"))], Settings(tokens_per_chunk=per_chunk, token_delay_s=0))
    assert [chunk.text for chunk in recorder.chunks("r1")] == expected
    assert recorder.chunks("r1")[-1].completion_tokens == 5


def test_two_requests_interleave() -> None:
    recorder = run([request("a", user("a1 a2 a3 a4")), request("b", user("b1 b2 b3 b4"))])
    order = [chunk.request_id for chunk in recorder.chunks()]
    assert order == ["a", "b"] * 4
    assert recorder.text("a") == "a1 a2 a3 a4" and recorder.text("b") == "b1 b2 b3 b4"


def test_token_delay_paces_chunks() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = EchoStream(recorder, Settings(token_delay_s=0.5), clock=clock)
    echo.handle(request("r1", user("a b c")))
    assert echo.step(0.0) == 0.5 and recorder.sent == []
    clock.now = 0.25
    echo.handle(request("r2", user("x y")))
    assert echo.step(0.5) == 0.75
    assert [chunk.request_id for chunk in recorder.chunks()] == ["r1"]
    assert echo.step(0.75) == 1.0
    assert echo.step(1.0) == 1.25
    assert echo.step(1.25) == 1.5
    assert echo.step(1.5) is None
    assert [(chunk.request_id, chunk.text) for chunk in recorder.chunks()] == [
        ("r1", "a"),
        ("r2", "x"),
        ("r1", " b"),
        ("r2", " y"),
        ("r1", " c"),
    ]
    assert echo.active == {}


def test_cancel_stops_without_a_finish() -> None:
    clock, recorder = Clock(), RecordingNode()
    echo = EchoStream(recorder, Settings(token_delay_s=0.1), clock=clock)
    echo.handle(request("r1", user("a b c d")))
    echo.handle(request("r2", user("x y")))
    echo.step(0.1)
    echo.handle(cancel("r1"))
    echo.handle(cancel("unknown"))
    while (due := echo.step(clock.now)) is not None and clock.now < 10:
        clock.now = due
    assert [chunk.text for chunk in recorder.chunks("r1")] == ["a"]
    assert recorder.text("r2") == "x y" and recorder.chunks("r2")[-1].fin
    assert echo.active == {}


def test_cancel_before_any_chunk_sends_nothing() -> None:
    recorder = run([request("r1", user("a b")), cancel("r1")])
    assert recorder.sent == []


def test_stamp_adds_sent_at() -> None:
    recorder = run([request("r1", user("a b"))], Settings(token_delay_s=0, stamp=True))
    assert all(isinstance(metadata["sent_at"], float) for metadata in recorder.metadata())


def test_stop_event_ends_the_run_at_once() -> None:
    recorder = run([request("r1", user("a b c")), {"type": "STOP", "id": "MANUAL"}, request("r2", user("x"))])
    assert recorder.sent == []


def test_ignores_timeouts_other_inputs_and_requests_without_id() -> None:
    timeout = {"type": "ERROR", "kind": "dora", "error": "Timeout event stream error: Receiver timed out"}
    other = {"type": "INPUT", "id": "tick", "value": pa.array([1]), "metadata": {}}
    anonymous = {"type": "INPUT", "id": "v1/chat/completions", "value": pa.array([user("hi")]), "metadata": {}}
    closed = {"type": "INPUT_CLOSED", "id": "cancel"}
    recorder = run([timeout, other, anonymous, closed, request("r1", user("ok"))])
    assert recorder.text("r1") == "ok"


def test_many_requests_finish_with_a_round_cap() -> None:
    recorder = run([request(f"r{i}", user(" ".join(["w"] * 10))) for i in range(600)])
    order = [chunk.request_id for chunk in recorder.chunks()]
    assert order[:600] == [f"r{i}" for i in range(600)] and len(order) == 6000
    assert sum(chunk.fin for chunk in recorder.chunks()) == 600


class QueueSource:
    """A source whose requests arrive one at a time, after chunks have started."""

    def __init__(self, events: list[dict[str, Any]]) -> None:
        self.events = events
        self.calls = 0

    def next(self, timeout: float | None = None) -> dict[str, Any] | None:
        self.calls += 1
        return self.events.pop(0) if self.events else None

    def drain(self) -> list[dict[str, Any]]:
        self.calls += 1
        return [self.events.pop(0)] if self.events else []


def test_new_requests_join_while_others_stream() -> None:
    recorder = RecordingNode()
    source = QueueSource([request("a", user("1 2 3 4 5 6")), request("b", user("x y"))])
    EchoStream(recorder, FAST).run(source)
    order = [chunk.request_id for chunk in recorder.chunks()]
    assert order.index("b") < len(order) - 1 and order[-1] == "a"
    assert source.calls < 20


def test_list_source_drains_everything_received() -> None:
    source = ListSource([{"type": "STOP"}, {"type": "STOP"}])
    assert source.next() == {"type": "STOP"} and source.drain() == [{"type": "STOP"}] and source.next() is None


@pytest.mark.parametrize(
    "environ, message",
    [
        ({"ECHO_TOKENS_PER_CHUNK": "0"}, "ECHO_TOKENS_PER_CHUNK"),
        ({"ECHO_TOKENS_PER_CHUNK": "two"}, "ECHO_TOKENS_PER_CHUNK"),
        ({"ECHO_TOKEN_DELAY_S": "-1"}, "ECHO_TOKEN_DELAY_S"),
        ({"ECHO_TOKEN_DELAY_S": "fast"}, "'fast'"),
    ],
)
def test_bad_settings_name_the_variable(environ: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_settings_from_env() -> None:
    assert Settings.from_env({}) == Settings(1, 0.02, False)
    environ = {"ECHO_TOKENS_PER_CHUNK": "3", "ECHO_TOKEN_DELAY_S": "0", "ECHO_STAMP": "1"}
    assert Settings.from_env(environ) == Settings(3, 0.0, True)


def test_main_outside_a_dataflow_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """It gets as far as joining the dataflow, and dora refuses for the reason expected: no node config."""
    monkeypatch.delenv("DORA_NODE_CONFIG", raising=False)
    with pytest.raises(RuntimeError, match="DORA_NODE_CONFIG env variable is not set"):
        main([])


class FakeDoraNode(RecordingNode):
    """``dora.Node`` for ``main``: ``next`` and ``drain`` hand over two requests, then its inputs close."""

    created: list[FakeDoraNode] = []

    def __init__(self, node_id: str | None = None) -> None:
        super().__init__()
        self.node_id = node_id
        self.source = ListSource([request("r1", user("one two three")), request("r2", user("four"))])
        FakeDoraNode.created.append(self)

    def next(self, timeout: float | None = None) -> Any:
        return self.source.next(timeout)

    def drain(self) -> list[Any]:
        return self.source.drain()


@pytest.mark.parametrize(
    "argv, environ, hello",
    [
        pytest.param([], {"DORA_NODE_CONFIG": "node_id: echo-stream-2\n"}, "echo-stream-2", id="dataflow-node-id"),
        pytest.param(["--name", "dyn"], {"ECHO_STEP_MS": "1"}, "dyn", id="dynamic-step-mode"),
    ],
)
def test_main_says_hello_then_serves_until_the_inputs_close(
    monkeypatch: pytest.MonkeyPatch, argv: list[str], environ: dict[str, str], hello: str
) -> None:
    import dora

    FakeDoraNode.created.clear()
    monkeypatch.setattr(dora, "Node", FakeDoraNode)
    monkeypatch.setenv("ECHO_TOKEN_DELAY_S", "0")
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    if "DORA_NODE_CONFIG" not in environ:
        monkeypatch.delenv("DORA_NODE_CONFIG", raising=False)
    main(argv)
    [node] = FakeDoraNode.created
    assert node.node_id == (argv[1] if argv else None)
    # The hello says the echo can continue another replica's answer and sends heartbeats while it holds work.
    expected = {"hello": hello, "can_continue": True, "heartbeat_s": 0.25}
    assert [(sent.output_id, sent.metadata) for sent in node.sent if sent.is_hello] == [("chunks", expected)]
    assert node.sent[0].is_hello  # before anything else
    assert (node.text("r1"), node.text("r2")) == ("one two three", "four")
    batches = sum(is_batch(sent.data) for sent in node.sent)
    assert batches == (3 if "ECHO_STEP_MS" in environ else 0)  # step mode: one message per step, 3 steps


@pytest.mark.parametrize("stream", [False, "false"])
def test_a_non_streaming_request_is_answered_in_one_message(stream: Any) -> None:
    recorder = run([request("r1", user("one two three four"), stream=stream, max_tokens=3)])
    (chunk,) = recorder.chunks("r1")
    assert chunk.text == "one two three" and chunk.fin and chunk.finish_reason == "length"
    assert chunk.completion_tokens == 3


# -- ECHO_MAX_CONCURRENT: a replica's capacity ------------------------------------------------------


def test_max_concurrent_generates_k_at_once_and_starts_the_rest_in_arrival_order() -> None:
    events = [request(f"r{i}", user(f"r{i}a r{i}b")) for i in range(4)]
    recorder = run(events, Settings(token_delay_s=0, max_concurrent=2))
    order = [chunk.request_id for chunk in recorder.chunks()]
    # r0 and r1 interleave; r2 starts when one of them ends, r3 after that: never more than 2 at once
    started: list[str] = []
    ended: set[str] = set()
    for chunk in recorder.chunks():
        if chunk.request_id not in started:
            started.append(chunk.request_id)
        if chunk.fin:
            ended.add(chunk.request_id)
        assert len(set(started) - ended) <= 2, order
    assert started == ["r0", "r1", "r2", "r3"]
    assert all(recorder.text(f"r{i}") == f"r{i}a r{i}b" for i in range(4))


def test_a_waiting_request_that_is_cancelled_never_starts() -> None:
    events = [request("r0", user("a b c")), request("r1", user("x y")), cancel("r1"), request("r2", user("z"))]
    recorder = run(events, Settings(token_delay_s=0, max_concurrent=1))
    assert recorder.chunks("r1") == [] and recorder.text("r0") == "a b c" and recorder.text("r2") == "z"


def test_max_concurrent_from_env() -> None:
    assert Settings.from_env({"ECHO_MAX_CONCURRENT": "4"}).max_concurrent == 4
    with pytest.raises(ValueError, match="ECHO_MAX_CONCURRENT"):
        Settings.from_env({"ECHO_MAX_CONCURRENT": "-1"})
