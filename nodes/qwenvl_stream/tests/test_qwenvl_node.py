"""The node's real model code on a tiny random Qwen2.5-VL, driven through the event loop with a recorder.

The model's text is random: tests check the wire structure (chunks, seq,
finish reason, token counts), never the words.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from qwenvl_helpers import EPS_DATA_URI, IMAGE, USER, SpyEngine, cancel, check_no_flush, check_stream, png_data_uri, request
from qwenvl_helpers import spy as make_spy
from qwenvl_stream.engine import QwenEngine, RowCriteria
from qwenvl_stream.generation import GenerationParams
from qwenvl_stream.main import main
from qwenvl_stream.model import ModelLoadError, load_model
from qwenvl_stream.scheduler import Scheduler
from qwenvl_stream.settings import Settings
from transformers import StoppingCriteria, StoppingCriteriaList

from openai_stream_protocol import Chunk
from openai_stream_protocol.testing import RecordingNode, wait_for

pytestmark = pytest.mark.timeout(120)

SYSTEM = "<|system|>\n"


@pytest.fixture
def engine(loaded_model: Any) -> SpyEngine:
    return make_spy(loaded_model, image_timeout_s=2)


def serve(engine: QwenEngine, events: Any) -> RecordingNode:
    recorder = RecordingNode()
    Scheduler(recorder, engine, Settings(model_name_or_path="tiny")).run(events(recorder) if callable(events) else events)
    return check_no_flush(recorder)


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def test_a_request_streams_several_chunks_then_a_finish_reason(engine: SpyEngine) -> None:
    recorder = serve(engine, [request("r1", [SYSTEM + "Be brief.", USER + "Hello there"], max_tokens=60)])
    chunks = recorder.chunks("r1")
    last = check_stream(chunks)
    assert len(chunks) >= 3, chunks  # at least two pieces and the finish marker
    assert last.finish_reason in ("stop", "length")
    assert last.prompt_tokens > 5 and 0 < last.completion_tokens <= 60
    assert text_of(chunks)


def test_a_png_data_uri_goes_through_the_vision_path(engine: SpyEngine, loaded_model: Any) -> None:
    calls: list[tuple[int, ...]] = []
    hook = loaded_model.model.model.visual.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    try:
        recorder = serve(
            engine,
            [
                request("img", [IMAGE + png_data_uri((60, 40)), USER + "What is it?"], max_tokens=8),
                request("txt", [USER + "What is it?"], max_tokens=8),
            ],
        )
    finally:
        hook.remove()
    with_image, without = check_stream(recorder.chunks("img")), check_stream(recorder.chunks("txt"))
    assert with_image.finish_reason in ("stop", "length")
    assert len(calls) == 1  # the vision tower ran once, for the one image
    # 60x40 resizes to 56x28: 2x4 patches of 14 px, merged 2x2 into 2 image tokens, plus vision start and end.
    assert with_image.prompt_tokens - without.prompt_tokens == 2 + 2


def test_max_tokens_gives_length(engine: SpyEngine) -> None:
    last = check_stream(serve(engine, [request("r1", [USER + "Count to ten"], max_tokens=5)]).chunks("r1"))
    assert last.finish_reason == "length" and last.completion_tokens == 5


def test_a_stop_string_ends_the_answer_before_it(engine: SpyEngine) -> None:
    full = text_of(serve(engine, [request("a", [USER + "Tell me more"], max_tokens=40)]).chunks("a"))
    assert len(full) > 6, full
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    chunks = serve(engine, [request("b", [USER + "Tell me more"], max_tokens=40, stop=[stop])]).chunks("b")
    assert text_of(chunks) == full[: full.find(stop)]
    assert check_stream(chunks).finish_reason == "stop"


def test_a_seed_makes_sampling_repeatable(engine: SpyEngine) -> None:
    def sample(request_id: str) -> str:
        event = request(request_id, [USER + "Surprise me"], max_tokens=20, temperature=1.5, top_p=0.95, seed=1234)
        return text_of(serve(engine, [event]).chunks(request_id))

    assert sample("s1") == sample("s2")


def test_cancel_stops_the_generation_within_a_token_or_two(engine: SpyEngine, loaded_model: Any) -> None:
    forwards: list[int] = []
    at_cancel: list[int] = []

    def slow_step(module: Any, args: Any) -> None:
        # 10 ms per model step, so that tokens are counted against the moment the cancel arrives.
        time.sleep(0.01)
        forwards.append(1)

    hook = loaded_model.model.register_forward_pre_hook(slow_step)

    def events(recorder: RecordingNode) -> Iterator[dict[str, Any]]:
        yield request("long", [USER + "Go on forever"], max_tokens=1500)
        if wait_for(lambda: len(forwards) >= 20, 30):
            at_cancel.append(len(forwards))
        yield cancel("long")
        yield request("next", [USER + "Another one"], max_tokens=4)

    try:
        recorder = serve(engine, events)
    finally:
        hook.remove()
    assert at_cancel, "the long request never reached 20 model steps"
    assert not any(c.fin for c in recorder.chunks("long"))
    assert engine.streams["long"].count <= at_cancel[0] + 2
    assert check_stream(recorder.chunks("next")).finish_reason == "length"


def test_row_criteria_masks_a_halted_row_at_the_very_next_token(loaded_model: Any) -> None:
    """What a cancel in a ``generate()`` batch relies on: the flag is read at every step, and only that row stops."""
    engine = QwenEngine(loaded_model, Settings(model_name_or_path="tiny"))
    params = GenerationParams(max_tokens=200)
    streams = [engine.stream(f"r{i}", params, threading.Event(), 0) for i in range(2)]

    class HaltRowZeroAfterFive(StoppingCriteria):
        def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs: Any) -> torch.BoolTensor:
            if input_ids.shape[-1] - prompt >= 5:
                streams[0].halt.set()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)  # type: ignore[return-value]

    prepared = [engine.prepare([USER + text], ()) for text in ("hi", "hello there")]
    inputs = engine._collate(prepared)
    prompt = inputs["input_ids"].shape[-1]
    criteria = StoppingCriteriaList([HaltRowZeroAfterFive(), RowCriteria(streams)])
    out = loaded_model.model.generate(
        **inputs, max_new_tokens=12, do_sample=False, stopping_criteria=criteria, pad_token_id=engine.pad_token_id
    )
    new = out[:, prompt:].tolist()
    assert len(new[1]) == 12 and new[1][5:] != [engine.pad_token_id] * 7
    assert new[0][5:] == [engine.pad_token_id] * 7


@pytest.mark.parametrize(
    "image, message",
    [
        pytest.param("data:image/png;base64,iVBORw0KGgoAAAA", "could not decode image", id="broken-data-uri"),
        pytest.param("http://127.0.0.1:9/missing.png", "image URL not allowed", id="loopback-url"),
        pytest.param(EPS_DATA_URI, "could not decode image 1: not a known image format", id="eps-never-reaches-ghostscript"),
    ],
)
def test_a_broken_image_ends_that_request_with_an_error_and_the_node_keeps_serving(
    engine: SpyEngine, image: str, message: str
) -> None:
    recorder = serve(
        engine,
        [
            request("bad", [IMAGE + image, USER + "What is it?"], max_tokens=5),
            request("good", [IMAGE + png_data_uri(), USER + "What is it?"], max_tokens=5),
        ],
    )
    bad = check_stream(recorder.chunks("bad"))
    assert bad.finish_reason == "error" and message in bad.error
    assert check_stream(recorder.chunks("good")).finish_reason in ("stop", "length")


def test_vision_max_pixels_scales_large_images_down(tiny_model_dir: Path) -> None:
    from PIL import Image

    def image_tokens(settings: Settings) -> int:
        processor = load_model(settings).processor
        text = "<|vision_start|><|image_pad|><|vision_end|>"
        grid = processor(text=[text], images=[Image.new("RGB", (200, 200))], return_tensors="pt")["image_grid_thw"]
        return int(grid.prod()) // 4

    assert image_tokens(Settings(model_name_or_path=str(tiny_model_dir))) == 16  # the checkpoint's limit: 112x112
    capped = Settings.from_env({"MODEL_NAME_OR_PATH": str(tiny_model_dir), "QWENVL_VISION_MAX_PIXELS": str(56 * 56)})
    assert image_tokens(capped) == 4


@pytest.mark.parametrize(
    "name, reason",
    [
        pytest.param("/nowhere/qwen", "no such directory", id="missing-directory"),
        pytest.param("NO_WEIGHTS", "weights or config files are missing", id="no-weights"),
        pytest.param("Qwen/Qwen2.5-VL-3B-Instruct-not-cached", "no network", id="hub-id-offline"),
    ],
)
def test_a_model_that_cannot_load_says_why(tmp_path: Path, tiny_model_dir: Path, name: str, reason: str) -> None:
    if name == "NO_WEIGHTS":
        name = str(tmp_path)
        for path in tiny_model_dir.iterdir():
            if not path.name.endswith(".safetensors"):
                (tmp_path / path.name).write_bytes(path.read_bytes())
    with pytest.raises(ModelLoadError, match=reason):
        load_model(Settings(model_name_or_path=name))


def run_main(model: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MODEL_NAME_OR_PATH": model, "HF_HUB_OFFLINE": "1"}
    env.pop("DORA_NODE_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-m", "qwenvl_stream.main"], env=env, capture_output=True, text=True, timeout=90, check=False
    )


def test_main_exits_with_the_reason_when_the_model_cannot_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_NAME_OR_PATH", str(tmp_path / "nowhere"))
    node = RecordingNode()
    with pytest.raises(SystemExit) as exited:
        main([], node_factory=lambda name: node)
    assert str(exited.value.code).startswith("qwenvl-stream: could not load")
    assert node.sent == []  # no hello: the server never counts on a replica that cannot answer


def test_main_joins_the_dataflow_before_loading_the_model(tiny_model_dir: Path) -> None:
    # Outside a dataflow dora's Node() fails: it does at once, before the (long) load.
    result = run_main(str(tiny_model_dir))
    assert result.returncode != 0
    assert "RuntimeError" in result.stderr and "model ready" not in result.stderr


def test_main_says_hello_once_the_model_is_loaded_then_serves(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import qwenvl_stream.model

    order: list[str] = []
    real_load = qwenvl_stream.model.load_model

    def load(settings: Settings) -> Any:
        order.append("load")
        return real_load(settings)

    class Node(RecordingNode):
        def send_output(self, output_id: str, data: Any, metadata: dict[str, Any] | None = None) -> None:
            order.append("hello" if metadata and "hello" in metadata else "send")
            super().send_output(output_id, data, metadata)

    created: list[Node] = []

    def factory(name: str | None) -> Node:
        order.append(f"node {name}")
        created.append(Node([request("r1", [USER + "Hello there"], max_tokens=8)]))
        return created[-1]

    monkeypatch.setattr(qwenvl_stream.model, "load_model", load)
    monkeypatch.setenv("MODEL_NAME_OR_PATH", str(tiny_model_dir))
    monkeypatch.setenv("DORA_NODE_CONFIG", "node_id: qwen-2\n")
    main([], node_factory=factory)
    [node] = created
    assert order[:3] == ["node None", "load", "hello"]
    assert node.statuses()[0].kind == "hello" and node.statuses()[0].node_id == "qwen-2"
    assert node.statuses()[0].can_continue and node.statuses()[0].heartbeat_s == 0.25
    assert check_stream(node.chunks("r1")).finish_reason in ("stop", "length")
