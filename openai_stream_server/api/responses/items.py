"""Responses output and input items as JSON, and their ids: derived from the response's id, so every rendering agrees."""

from __future__ import annotations

from typing import Any

from ...state import StreamState
from .echo import Echo


def message_id(response_id: str, nth: int = 0) -> str:
    """The ``nth`` output message's id (0: the first, usually the only one): derived from the response's, so that
    every rendering agrees."""
    base = "msg_" + response_id.removeprefix("resp_")
    return base if nth == 0 else f"{base}_{nth}"


def reasoning_id(response_id: str, nth: int = 0) -> str:
    """The ``nth`` reasoning item's id, derived from the response's as the messages' are."""
    base = "rs_" + response_id.removeprefix("resp_")
    return base if nth == 0 else f"{base}_{nth}"


def function_call_item_id(response_id: str, index: int) -> str:
    """The output item id of the response's call ``index`` (the node's ``tool_call_index``)."""
    return f"fc_{response_id.removeprefix('resp_')}_{index}"


def item_status(status: str) -> str:
    """An output item's status for its response's: ``completed``, ``in_progress`` or ``incomplete``."""
    return {"completed": "completed", "queued": "in_progress", "in_progress": "in_progress"}.get(status, "incomplete")


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def message_item(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    """An assistant message item; ``text`` None: no content part yet (as ``output_item.added`` has it)."""
    return {
        "id": item_id,
        "type": "message",
        "status": status,
        "role": "assistant",
        "content": [] if text is None else [output_text(text)],
    }


def reasoning_text(text: str) -> dict[str, Any]:
    return {"type": "reasoning_text", "text": text}


def reasoning_item(item_id: str, status: str, text: str | None) -> dict[str, Any]:
    """A reasoning item (its text as one ``reasoning_text`` part, no summary); ``text`` None: no part yet."""
    return {
        "id": item_id,
        "type": "reasoning",
        "status": status,
        "summary": [],
        "content": [] if text is None else [reasoning_text(text)],
    }


def function_call_item(item_id: str, call_id: str, name: str, arguments: str, status: str) -> dict[str, Any]:
    return {"type": "function_call", "id": item_id, "call_id": call_id, "name": name, "arguments": arguments, "status": status}


def input_item_list(state: StreamState, echo: Echo) -> list[dict[str, Any]]:
    """The request's own input as Responses items, in order: consecutive text and image parts of one role are one
    message, each call of a tool-calls part a ``function_call`` item, each tool result a ``function_call_output``.

    Item ids are derived from the response id and the item's place, so every listing agrees.
    """
    base = state.request_id.removeprefix("resp_")
    items: list[dict[str, Any]] = []

    def next_id(prefix: str) -> str:
        return f"{prefix}_{base}_in{len(items)}"

    for part in state.surface_data.parts[echo.input_from :]:
        if part.kind == "tool_calls":
            for call in part.calls():
                items.append(function_call_item(next_id("fc"), call.id, call.name, call.arguments, "completed"))
            continue
        if part.role == "tool":
            output = {"type": "function_call_output", "call_id": part.tool_call_id or "", "output": part.content}
            items.append({"id": next_id("fco"), **output, "status": "completed"})
            continue
        if part.role == "assistant":
            content = output_text(part.content)
        elif part.kind == "image":
            content = {"type": "input_image", "image_url": part.content, "detail": "auto"}
        else:
            content = {"type": "input_text", "text": part.content}
        last = items[-1] if items else None
        if last is not None and last["type"] == "message" and last["role"] == part.role:
            last["content"].append(content)
        else:
            items.append(
                {"id": next_id("msg"), "type": "message", "role": part.role, "status": "completed", "content": [content]}
            )
    return items
