"""Request validation shared by the API surfaces (pydantic v2): accept what the SDKs send, reject what we cannot serve.

Unknown fields are ignored, not rejected, as vLLM and the OpenAI API do.
Validation runs in JSON mode and strict, so ``"max_tokens": "5"`` is a type
error rather than silently coerced; errors are turned into ``InvalidRequest``
with ``param`` naming the field as the surface's API names it: OpenAI's
``messages[0].content[1].type``, or Anthropic's ``messages.0.content.1.type``
(``dotted``).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError

from .errors import InvalidRequest


class StrictModel(BaseModel):
    """Base of every request model: unknown fields ignored, types strict, instances frozen."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# Integers travel to the node as dora metadata, which holds i64: dora-rs 1.1.0's send_output raises
# OverflowError beyond it, which would turn a bad request into a 503 (found by tests/unit/test_fuzz.py).
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

MAX_MODEL_CHARS = 256
"""The model name is echoed in every chunk and logged once per completion: keep it bounded."""

MAX_STOP_STRINGS = 16
"""Stop strings per request at most, on every surface: a node searches each on every token (the qwen node inside its
batch lock), so their number and length bound the cost of one request to every other (docs/architecture.md, "Limits")."""

MAX_STOP_CHARS = 256
"""Characters per stop string at most."""

StopString = Annotated[str, Field(max_length=MAX_STOP_CHARS)]

StopList = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]
"""Anthropic's ``stop_sequences``."""

OpenAIStop = StopString | Annotated[list[StopString], Field(max_length=min(4, MAX_STOP_STRINGS))]
"""The OpenAI surfaces' ``stop``: one string or a list of at most 4 (OpenAI's own limit, under ``MAX_STOP_STRINGS``)."""


_CODES = {
    "missing": "missing_required_parameter",
    "json_invalid": "invalid_json",
    "json_type": "invalid_json",
    "literal_error": "invalid_value",
    "too_short": "invalid_value",
    "too_long": "invalid_value",
    "greater_than_equal": "invalid_value",
    "less_than_equal": "invalid_value",
}


def field_names(*models: type[BaseModel]) -> frozenset[str]:
    """The field names of request models: what may appear in an error's ``param``."""
    return frozenset(name for model in models for name in model.model_fields)


def error_at(field: str, why: str = "Field required") -> PydanticCustomError:
    """A model check's error naming a field below the model it runs on (``_param`` appends ``field``)."""
    return PydanticCustomError("invalid_field", "{why}", {"field": field, "why": why})


def _param(error: Any, fields: frozenset[str], dotted: bool) -> str | None:
    """``('messages', 0, 'list[ContentPart]', 1, 'type')`` -> ``messages[0].content[1].type`` (``dotted``:
    ``messages.0.content.1.type``), then the field an ``error_at`` names.

    Union members add their own tags to pydantic's location; only field names
    and list indices name something in the request.
    """
    names: list[str | int] = [item for item in error["loc"] if isinstance(item, int) or item in fields]
    below = (error.get("ctx") or {}).get("field")
    if below:
        names.extend(below.split("."))
    if dotted:
        return ".".join(str(name) for name in names) or None
    text = ""
    for name in names:
        if isinstance(name, int) or name.isdigit():
            text += f"[{name}]"
        else:
            text += f".{name}" if text else name
    return text or None


M = TypeVar("M", bound=BaseModel)


def parse_json(model: type[M], body: bytes, fields: frozenset[str], *, dotted: bool = False) -> M:
    """Validate a request body; raises ``InvalidRequest`` naming the first offending field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc, fields, dotted=dotted) from None


def invalid_request(exc: ValidationError, fields: frozenset[str], *, dotted: bool = False) -> InvalidRequest:
    """The ``InvalidRequest`` for a pydantic error: the deepest alternative, its field named as in the request.

    ``dotted`` (Anthropic's naming): the message is pydantic's alone, and the error shape leads it with
    the field (``anthropic_errors.error_message``).
    """
    error = _first_relevant(exc.errors(include_url=False))
    kind = error["type"]
    if kind in ("json_invalid", "json_type"):
        return InvalidRequest("The request body is not a valid JSON object.", code="invalid_json")
    param = _param(error, fields, dotted)
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    if dotted:
        return InvalidRequest(error["msg"], param=param, code=code)
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid value for {where}: {error['msg']}", param=param, code=code)


def _first_relevant(errors: list[Any]) -> Any:
    """Of a union's alternatives pydantic reports each; prefer the one that went deepest into the value."""
    return max(errors, key=lambda e: len(e["loc"]))
