"""Request validation shared by the API surfaces (pydantic v2): accept what the SDKs send, reject what we cannot serve.

Unknown fields are ignored, not rejected, as vLLM and the OpenAI API do.
Validation runs in JSON mode and strict, so ``"max_tokens": "5"`` is a type
error rather than silently coerced; errors are turned into ``InvalidRequest``
with ``param`` naming the field (``messages[0].content[1].type``).
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import InvalidRequest


class StrictModel(BaseModel):
    """Base of every request model: unknown fields ignored, types strict, instances frozen."""

    model_config = ConfigDict(extra="ignore", strict=True, frozen=True)


# Integers travel to the node as dora metadata, which holds i64: dora-rs 1.1.0's send_output raises
# OverflowError beyond it, which would turn a bad request into a 503 (found by tests/unit/test_fuzz.py).
I64_MIN, I64_MAX = -(2**63), 2**63 - 1

MAX_MODEL_CHARS = 256
"""The model name is echoed in every chunk and logged once per completion: keep it bounded."""

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


def _param(loc: tuple[int | str, ...], fields: frozenset[str]) -> str | None:
    """``('messages', 0, 'list[ContentPart]', 1, 'type')`` -> ``messages[0].content[1].type``.

    Union members add their own tags to pydantic's location; only field names
    and list indices name something in the request.
    """
    text = ""
    for item in loc:
        if isinstance(item, int):
            text += f"[{item}]"
        elif item in fields:
            text += f".{item}" if text else item
    return text or None


M = TypeVar("M", bound=BaseModel)


def parse_json(model: type[M], body: bytes, fields: frozenset[str]) -> M:
    """Validate a request body; raises ``InvalidRequest`` naming the first offending field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise invalid_request(exc, fields) from None


def invalid_request(exc: ValidationError, fields: frozenset[str]) -> InvalidRequest:
    """The ``InvalidRequest`` for a pydantic error: the deepest alternative, its field named as in the request."""
    error = _first_relevant(exc.errors(include_url=False))
    param = _param(tuple(error["loc"]), fields)
    kind = error["type"]
    if kind in ("json_invalid", "json_type"):
        return InvalidRequest("The request body is not a valid JSON object.", code="invalid_json")
    code = _CODES.get(kind, "invalid_type" if kind.endswith("_type") else "invalid_value")
    where = f"'{param}'" if param else "the request body"
    return InvalidRequest(f"Invalid value for {where}: {error['msg']}", param=param, code=code)


def _first_relevant(errors: list[Any]) -> Any:
    """Of a union's alternatives pydantic reports each; prefer the one that went deepest into the value."""
    return max(errors, key=lambda e: len(e["loc"]))
