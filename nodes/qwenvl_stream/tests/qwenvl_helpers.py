"""Helpers shared by this folder's tests: a recorder node, events as the server sends them, a PNG."""

from __future__ import annotations

import base64
import io
from typing import Any

import pyarrow as pa


class Recorder:
    """Stands in for ``dora.Node.send_output``; keeps every message with its metadata."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, list[str], dict[str, Any]]] = []

    def send_output(self, output_id: str, data: pa.Array, metadata: dict[str, Any] | None = None) -> None:
        self.messages.append((output_id, data.to_pylist(), dict(metadata or {})))

    def chunks(self, request_id: str) -> list[tuple[str, dict[str, Any]]]:
        return [("".join(texts), md) for _, texts, md in self.messages if md.get("request_id") == request_id]


def request(request_id: str, texts: list[str], **metadata: Any) -> dict[str, Any]:
    """An INPUT event as the server sends it."""
    return {
        "type": "INPUT",
        "id": "v1/chat/completions",
        "value": pa.array(texts, type=pa.string()),
        "metadata": {"request_id": request_id, "session_id": request_id, "model": "m", "stream": True, **metadata},
    }


def cancel(request_id: str) -> dict[str, Any]:
    return {
        "type": "INPUT",
        "id": "cancel",
        "value": pa.array([request_id], type=pa.string()),
        "metadata": {"request_id": request_id},
    }


def png_data_uri(size: tuple[int, int] = (60, 40), color: tuple[int, int, int] = (0, 128, 255)) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def check_stream(chunks: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The wire invariants of one request's chunks; returns the last chunk's metadata."""
    assert chunks, "no chunk was sent"
    assert [md["seq"] for _, md in chunks] == list(range(len(chunks)))
    assert [bool(md.get("fin")) for _, md in chunks] == [False] * (len(chunks) - 1) + [True]
    assert all("flush" not in md for _, md in chunks)
    return chunks[-1][1]
