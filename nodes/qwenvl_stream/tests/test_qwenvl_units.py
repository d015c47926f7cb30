"""The node's pure parts: settings, request parameters, stop strings, chat building, images."""

from __future__ import annotations

import base64
import http.server
import logging
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageFile
from qwenvl_helpers import EPS_DATA_URI, TRUNCATED_PNG_WITH_A_NEWLINE, bomb_png_data_uri, image_data_uri, png_data_uri
from qwenvl_stream.chat import to_chat
from qwenvl_stream.fetch import UrlFetcher
from qwenvl_stream.generation import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    GenerationParams,
    RequestError,
    RowStream,
    StopFilter,
    sampling_kwargs,
)
from qwenvl_stream.images import ImageError, ImageLimits, ImageLoader, load_image, load_images
from qwenvl_stream.settings import Settings

from openai_stream_protocol import Part, parse_request_texts

ROOT = Path(__file__).resolve().parents[3]
LIMITS = ImageLimits(max_bytes=1_000_000, max_pixels=4_000_000, timeout_s=5.0)


def test_settings_from_env_reads_model_and_knobs() -> None:
    settings = Settings.from_env(
        {"MODEL_NAME_OR_PATH": "/models/qwen", "QWENVL_MAX_QUEUED_REQUESTS": "3", "QWENVL_IMAGE_TIMEOUT_S": "2.5"}
    )
    assert settings.model_name_or_path == "/models/qwen"
    assert settings.max_queued_requests == 3 and settings.image_timeout_s == 2.5
    assert Settings.from_env({}).model_name_or_path == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert Settings.from_env({}).max_batch == 8 and Settings.from_env({"QWENVL_MAX_BATCH": "1"}).max_batch == 1
    assert not Settings.from_env({"QWENVL_CONTINUOUS_BATCHING": "0"}).continuous_batching


@pytest.mark.parametrize(
    "environ, name",
    [
        pytest.param({"QWENVL_MAX_QUEUED_REQUESTS": "many"}, "QWENVL_MAX_QUEUED_REQUESTS", id="not-a-number"),
        pytest.param({"QWENVL_DEFAULT_MAX_TOKENS": "0"}, "QWENVL_DEFAULT_MAX_TOKENS", id="zero"),
        pytest.param({"QWENVL_MAX_BATCH": "0"}, "QWENVL_MAX_BATCH", id="zero-batch"),
    ],
)
def test_a_bad_setting_names_its_variable(environ: dict[str, str], name: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env(environ)


def params(**metadata: Any) -> GenerationParams:
    return GenerationParams.from_metadata(metadata, default_max_tokens=100, max_tokens_limit=1000)


def test_generation_params_from_metadata() -> None:
    p = params(max_tokens=7, temperature=0.5, top_p=0.9, stop=["\n\n", ""], seed=3)
    assert p == GenerationParams(max_tokens=7, temperature=0.5, top_p=0.9, stop=("\n\n",), seed=3)
    # dora turns None metadata values into the string "None"; strings of numbers are read leniently.
    assert params(max_tokens="None", temperature="None", stop="None") == GenerationParams(max_tokens=100)
    assert params(max_tokens="12", stop="END").max_tokens == 12 and params(stop="END").stop == ("END",)
    assert params(max_tokens=0).max_tokens == 100 and params(max_tokens=10**6).max_tokens == 1000


@pytest.mark.parametrize(
    "metadata, key",
    [
        pytest.param({"temperature": -1}, "temperature", id="negative-temperature"),
        pytest.param({"top_p": 0}, "top_p", id="zero-top-p"),
        pytest.param({"max_tokens": "lots"}, "max_tokens", id="max-tokens-text"),
        pytest.param({"stop": [1, 2]}, "stop", id="stop-not-strings"),
        pytest.param({"seed": 1.5}, "seed", id="fractional-seed"),
    ],
)
def test_bad_parameters_are_request_errors(metadata: dict[str, Any], key: str) -> None:
    with pytest.raises(RequestError, match=key):
        params(**metadata)


def test_stop_strings_are_capped_in_count_and_length_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """The server refuses more with a 400; a client talking to the node directly gets the first 16, not 20,000."""
    longest, too_long = "x" * MAX_STOP_CHARS, "y" * (MAX_STOP_CHARS + 1)
    many = [too_long, longest, *(f"stop{i}" for i in range(20_000))]
    with caplog.at_level(logging.WARNING, logger="qwenvl_stream.generation"):
        stop = params(stop=many, request_id="r1").stop
    assert stop == (longest, *(f"stop{i}" for i in range(MAX_STOP_STRINGS - 1)))
    assert [r.getMessage() for r in caplog.records] == [
        "request 'r1': 19986 of its 20002 stop strings ignored (at most 16, of at most 256 characters each)"
    ]
    caplog.clear()
    assert params(stop=[f"s{i}" for i in range(MAX_STOP_STRINGS)]).stop == tuple(f"s{i}" for i in range(16))
    assert caplog.records == []  # within the bounds: nothing dropped, nothing logged


def test_sampling_kwargs() -> None:
    assert sampling_kwargs(GenerationParams(5)) == {}
    assert sampling_kwargs(GenerationParams(5, temperature=0, top_p=0.5)) == {"do_sample": False}
    assert sampling_kwargs(GenerationParams(5, temperature=0.7)) == {"do_sample": True, "temperature": 0.7}
    assert sampling_kwargs(GenerationParams(5, top_p=0.8)) == {"do_sample": True, "top_p": 0.8}


@pytest.mark.parametrize(
    "stops, pieces, sent, matched",
    [
        pytest.param([], ["a", "b"], "ab", None, id="no-stops"),
        pytest.param(["END"], ["hello E", "N", "D more"], "hello ", "END", id="split-over-pieces"),
        pytest.param(["END"], ["hello E", "NX"], "hello ENX", None, id="held-then-released"),
        pytest.param(["b", "abc"], ["xab"], "xa", "b", id="earliest-wins"),
        pytest.param(["XY", "X"], ["a XY b"], "a ", "X", id="same-place-the-shorter"),
        pytest.param(["\n\n"], ["one\n", "\ntwo"], "one", "\n\n", id="newlines"),
        pytest.param(["zz"], ["abc", "z"], "abcz", None, id="flushed-at-end"),
    ],
)
def test_stop_filter(stops: list[str], pieces: list[str], sent: str, matched: str | None) -> None:
    stop_filter = StopFilter(stops)
    out = "".join(stop_filter.feed(piece) for piece in pieces) + stop_filter.flush()
    assert (out, stop_filter.hit, stop_filter.matched) == (sent, matched is not None, matched)


class CharTokenizer:
    """A token is one character (its code point); 0 is the end of text."""

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return "".join(chr(t) for t in token_ids if t)


@pytest.mark.parametrize(
    "text, max_tokens, expected",
    [
        pytest.param("ab STOP cd", 50, ("ab ", "stop", "STOP"), id="a-stop-string"),
        pytest.param("ab\0", 50, ("ab", "stop", None), id="end-of-text"),
        pytest.param("abcdef STOP", 3, ("abc", "length", None), id="max-tokens-first"),
    ],
)
def test_a_row_stream_outcome_names_the_stop_string_that_ended_it(
    text: str, max_tokens: int, expected: tuple[str, str, str | None]
) -> None:
    params = GenerationParams(max_tokens, stop=("STOP",))
    stream = RowStream("r", params, threading.Event(), CharTokenizer(), frozenset({0}), prompt_tokens=1)
    sent, outcome = "", None
    for char in text:
        row = stream.push(ord(char))
        if row is not None:
            sent += row.text
            if row.ended:
                outcome = row.outcome
                break
    assert outcome is not None
    assert (sent, outcome.finish_reason, outcome.stop_sequence) == expected


def test_chat_from_request_texts_keeps_turns_and_image_order() -> None:
    texts = [
        Part("system", "text", "be brief").encode(),
        Part("user", "image", "https://example.invalid/a.png").encode(),
        Part("user", "text", "What is this?").encode(),
        Part("assistant", "text", "A cat.").encode(),
        Part("tool", "text", '{"ok": true}').encode(),
        Part("user", "image", "data:image/png;base64,xx").encode(),
        Part("user", "text", "And this?").encode(),
    ]
    chat = to_chat(parse_request_texts(texts))
    assert [m["role"] for m in chat.messages] == ["system", "user", "assistant", "tool", "user"]
    assert chat.messages[1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is this?"}]
    assert chat.image_sources == ["https://example.invalid/a.png", "data:image/png;base64,xx"]


def test_image_from_data_uri_and_raw_base64() -> None:
    uri = png_data_uri((30, 20))
    assert load_image(uri, LIMITS).size == (30, 20)
    assert load_image(uri.split(",", 1)[1], LIMITS).mode == "RGB"


@pytest.mark.parametrize(
    "source, message",
    [
        pytest.param("data:image/png;base64,AAAA", "not a known image format", id="not-an-image"),
        pytest.param("data:image/png;base64,@@@", "valid base64", id="bad-base64"),
        pytest.param("data:text/plain;base64,aGk=", "not an image", id="wrong-media-type"),
        pytest.param("data:image/png;base64", "no comma", id="no-comma"),
        pytest.param("file:///etc/passwd", "image URL not allowed", id="file-url"),
        pytest.param("   ", "empty", id="empty"),
    ],
)
def test_bad_images_raise_image_error(source: str, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        load_image(source, LIMITS)


def test_image_limits_are_checked_before_decoding() -> None:
    big = png_data_uri((300, 300))
    with pytest.raises(ImageError, match="larger than"):
        load_image(big, ImageLimits(max_bytes=100, max_pixels=10**9, timeout_s=1))
    with pytest.raises(ImageError, match="pixels"):
        load_image(big, ImageLimits(max_bytes=10**9, max_pixels=300 * 299, timeout_s=1))


# The node's defaults: 16 images, 64 Mi pixels each, 256 Mi pixels per request.
REQUEST_LIMITS = ImageLoader.from_settings(Settings()).limits


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """Any decode (PIL's ``ImageFile.load``) fails the test instead of allocating: the sizes it was asked for."""
    decoded: list[tuple[int, int]] = []

    def load(image: Any) -> None:
        decoded.append(image.size)
        raise AssertionError(f"an image of {image.size} was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", load)
    return decoded


def test_too_many_images_are_refused_before_any_is_fetched(no_decoding: list[tuple[int, int]]) -> None:
    # Fetching any of these would fail differently (the strict policy refuses the URL, or the name does not resolve).
    sources = ["http://example.invalid/a.png"] * 17
    with pytest.raises(
        ImageError, match=r"^too many images: 17 in one request, at most 16 allowed \(QWENVL_MAX_IMAGES_PER_REQUEST\)$"
    ):
        load_images(sources, REQUEST_LIMITS)
    assert no_decoding == []


def test_the_total_pixels_of_a_request_are_checked_from_the_headers_before_any_decode(
    no_decoding: list[tuple[int, int]],
) -> None:
    bomb = bomb_png_data_uri((8192, 8192))
    assert len(bomb) < 12_000  # ~8 KB of PNG; 8192 x 8192 x 3 bytes once converted to RGB
    assert 8192 * 8192 == REQUEST_LIMITS.max_pixels  # each one alone is within the per-image limit
    with pytest.raises(ImageError, match=r"268435456 pixels allowed in all \(QWENVL_MAX_TOTAL_IMAGE_PIXELS\): image 5"):
        load_images([bomb] * 5, REQUEST_LIMITS)
    assert no_decoding == []  # four passed their header check; none was decoded


def test_a_request_within_the_limits_is_decoded_in_order() -> None:
    sources = [png_data_uri((30, 20)), png_data_uri((20, 30))]
    limits = ImageLimits(10**6, 600, 5.0, max_images=2, max_total_pixels=1200)
    assert [(image.size, image.mode) for image in load_images(sources, limits)] == [((30, 20), "RGB"), ((20, 30), "RGB")]
    with pytest.raises(ImageError, match="QWENVL_MAX_TOTAL_IMAGE_PIXELS"):
        load_images([*sources, png_data_uri((1, 1))], ImageLimits(10**6, 600, 5.0, max_total_pixels=1200))


@pytest.mark.parametrize(
    "source",
    [
        pytest.param(EPS_DATA_URI, id="eps"),
        pytest.param(image_data_uri(Image.new("RGB", (16, 16)), "TIFF"), id="tiff"),
        pytest.param(image_data_uri(Image.new("RGB", (16, 16)), "PPM"), id="ppm"),
    ],
)
def test_formats_outside_the_allow_list_are_refused_unread(source: str, no_decoding: list[tuple[int, int]]) -> None:
    with pytest.raises(ImageError) as refused:
        load_image(source, LIMITS)
    assert str(refused.value) == "could not decode image: not a known image format (PNG, JPEG, WebP, GIF or BMP)"
    assert no_decoding == []


@pytest.mark.parametrize("image_format", ["PNG", "JPEG", "WEBP", "GIF", "BMP"])
def test_allowed_formats_decode(image_format: str) -> None:
    assert load_image(image_data_uri(Image.new("RGB", (16, 8), (10, 200, 30)), image_format), LIMITS).size == (16, 8)


def test_a_decoder_error_reaches_the_client_as_a_fixed_text_and_the_log_escaped(caplog: pytest.LogCaptureFixture) -> None:
    source = TRUNCATED_PNG_WITH_A_NEWLINE
    with caplog.at_level(logging.WARNING, logger="qwenvl_stream.images"), pytest.raises(ImageError) as failed:
        load_images([source], LIMITS)
    assert str(failed.value) == "could not decode image 1: the data is damaged or incomplete"
    [record] = caplog.records
    assert "truncated" in record.getMessage()  # the decoder's own words, for the operator
    assert "\n" not in record.getMessage()


@pytest.fixture
def image_server() -> Iterator[str]:
    """A local HTTP server on 127.0.0.1: /ok.png is an image, anything else 404."""
    png = base64.b64decode(png_data_uri((16, 16)).split(",", 1)[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/ok.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            else:
                self.send_error(404)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# The server is on 127.0.0.1: only a fetcher that allows private addresses reaches it.
LOCAL = UrlFetcher(allow_private=True)


def test_image_over_http(image_server: str) -> None:
    assert load_image(image_server + "/ok.png", LIMITS, LOCAL).size == (16, 16)
    with pytest.raises(ImageError, match="^image fetch failed$"):
        load_image(image_server + "/missing.png", LIMITS, LOCAL)
    with pytest.raises(ImageError, match="bytes"):
        load_image(image_server + "/ok.png", ImageLimits(max_bytes=10, max_pixels=10**6, timeout_s=5), LOCAL)


def test_image_from_a_closed_port_fails_fast() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ImageError, match="^image fetch failed$"):
        load_image(f"http://127.0.0.1:{port}/cat.png", LIMITS, LOCAL)


def test_cluster_yaml_is_qwenvl_yaml_with_gpu_labelled_replicas() -> None:
    """Each replica is qwenvl.yml's model node on its own output pair, placed by label, under a restart policy."""
    single = yaml.safe_load((ROOT / "qwenvl.yml").read_text())
    cluster = yaml.safe_load((ROOT / "qwenvl-cluster.yml").read_text())
    server, *replicas = cluster["nodes"]
    single_server, model = single["nodes"]
    assert [r["id"] for r in replicas] == ["qwenvl-stream-1", "qwenvl-stream-2"]
    for replica in replicas:
        rid = replica.pop("id")
        assert replica.pop("deploy") == {"labels": {"gpu": "true"}}
        assert replica.pop("restart_policy") == "on-failure"
        assert {k: replica.pop(k) for k in ("max_restarts", "restart_window")} == {"max_restarts": 5, "restart_window": 600.0}
        assert replica.pop("restart_delay") > 0 and replica.pop("max_restart_delay") > 0
        sources = {name: spec["source"] for name, spec in replica["inputs"].items()}
        assert sources == {
            "v1/chat/completions": f"openai-stream-server/v1/chat/completions/{rid}",
            "cancel": f"openai-stream-server/cancel/{rid}",
            "resend": f"openai-stream-server/resend/{rid}",
        }
        assert server["inputs"][f"chunks/{rid}"]["source"] == f"{rid}/chunks"
        assert {f"v1/chat/completions/{rid}", f"cancel/{rid}", f"resend/{rid}"} <= set(server["outputs"])
        assert {k: v for k, v in replica.items() if k != "inputs"} == {
            k: v for k, v in model.items() if k not in ("id", "inputs")
        }
    assert server["env"] == single_server["env"] and server["build"] == single_server["build"]
    assert all("deploy" not in node for node in single["nodes"])  # `dora run` refuses a `deploy` section


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["qwenvl.yml"], id="qwenvl.yml"),
        pytest.param(["qwenvl-cluster.yml"], id="qwenvl-cluster.yml"),
        pytest.param(["--node-manifest", "nodes/qwenvl_stream/dora-node.yml"], id="dora-node.yml"),
    ],
)
def test_dora_validates_the_dataflows_and_the_manifest(args: list[str]) -> None:
    dora = Path(sys.executable).parent / "dora"
    result = subprocess.run([str(dora), "validate", *args], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
