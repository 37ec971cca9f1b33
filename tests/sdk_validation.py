"""Strict wire-schema checks built on OpenRouter's official Python SDK (tests only).

The SDK's pydantic models are lenient on purpose: unknown keys are silently ignored
and "open" unions fall back to an ``Unknown*`` placeholder when a payload does not
match (even for a *known* discriminator whose payload is malformed).  These helpers
turn both of those into hard failures so that tests catch misspelt keys and types:

* ``validate_request(body)``        -- ``ResponsesRequest`` + no unknown keys anywhere
* ``validate_stream_event(event)``  -- ``StreamEvents`` union, no silent fallback
* ``validate_response(obj)``        -- ``OpenResponsesResult`` (non-stream body)
* ``validate_models_list(obj)``     -- ``ModelsListResponse`` (GET /models body)
* ``parse_sse(raw)``                -- tiny reference SSE splitter for tests

Unknown-key checking walks the raw JSON next to the validated model tree: for every
dict that became a pydantic model, every key must be a field alias (or the field
name when it has no alias) of the model class pydantic actually chose.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from functools import cache
from typing import Any

import pydantic
from openrouter import components as C
from openrouter.components import streamevents as _se

__all__ = [
    "RELAXATIONS",
    "SchemaError",
    "known_event_types",
    "parse_sse",
    "validate_models_list",
    "validate_request",
    "validate_response",
    "validate_stream_event",
]


class SchemaError(AssertionError):
    """Raised when a payload does not match the SDK schema strictly."""


#: Places where real OpenRouter traffic is looser than SDK 1.3.84's schema; the helpers
#: accept the real form.  Keep this list short and evidence-based.
RELAXATIONS = {
    "input_image.detail": "SDK marks it required; the captured request "
    "(test_image_prompt.yaml) omitted it and OpenRouter answered 200.",
}


#: SDK classes whose docstring says they take extra keys (pydantic `extra="allow"` with
#: `additional_properties`); their extras are part of the schema, not typos.
OPEN_CLASSES = frozenset({
    "ImageGenerationServerToolConfig",  # "Accepts all image_config params … plus a model field"
})


# --------------------------------------------------------------------------- helpers


def _wire_keys(model_cls: type[pydantic.BaseModel]) -> set[str]:
    return {f.alias or name for name, f in model_cls.model_fields.items()}


def _is_unknown(obj: Any) -> bool:
    return getattr(obj, "is_unknown", False) is True and hasattr(obj, "raw")


def _walk(raw: Any, val: Any, path: str) -> None:
    """Compare raw JSON with the validated tree; raise on extras / unknown fallbacks."""
    if _is_unknown(val):
        kind = raw.get("type") if isinstance(raw, dict) else type(raw).__name__
        raise SchemaError(f"{path}: payload of type {kind!r} only matched an Unknown fallback")
    if isinstance(val, pydantic.BaseModel) and isinstance(raw, dict):
        cls = type(val)
        extra = set(raw) - _wire_keys(cls)
        if extra and cls.__name__ not in OPEN_CLASSES:
            raise SchemaError(f"{path}: unknown key(s) {sorted(extra)} for {cls.__name__}")
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key in raw:
                _walk(raw[key], getattr(val, name), f"{path}.{key}")
    elif isinstance(raw, list) and isinstance(val, (list, tuple)):
        for i, (r, v) in enumerate(zip(raw, val, strict=False)):
            _walk(r, v, f"{path}[{i}]")
    elif isinstance(raw, dict) and isinstance(val, dict):
        for k, r in raw.items():
            if k in val:
                _walk(r, val[k], f"{path}.{k}")


def _validate(model: Any, obj: Any, what: str) -> Any:
    try:
        if isinstance(model, type) and issubclass(model, pydantic.BaseModel):
            return model.model_validate(obj)
        return _adapter(model).validate_python(obj)
    except pydantic.ValidationError as exc:
        raise SchemaError(f"{what} does not match the SDK schema: {_summary(exc)}") from exc


def _loc(loc: tuple) -> str:
    return ".".join("<union>" if len(str(p)) > 40 else str(p) for p in loc)


def _summary(exc: pydantic.ValidationError, limit: int = 4) -> str:
    """Short error text: smart unions otherwise print hundreds of alternatives."""
    errors = exc.errors()
    lines = [f"{_loc(e['loc'])}: {e['msg']}" for e in errors[:limit]]
    more = f" (+{len(errors) - limit} more)" if len(errors) > limit else ""
    return "; ".join(lines) + more


@cache
def _adapter(tp: Any) -> pydantic.TypeAdapter:
    return pydantic.TypeAdapter(tp)


# --------------------------------------------------------------------------- requests


def validate_request(body: dict) -> None:
    """Validate a ``POST /responses`` body against ``ResponsesRequest`` strictly.

    Fails on any key that is not a field alias of the model the SDK chose, at the
    top level and inside ``input`` items, content parts, ``tools``, ``reasoning``,
    ``text``, ``provider``, ``plugins`` ... (free-form JSON such as a tool's
    ``parameters`` schema or ``metadata`` values is not checked).
    """
    if not isinstance(body, dict):
        raise SchemaError(f"request body must be an object, got {type(body).__name__}")
    extra = set(body) - _wire_keys(C.ResponsesRequest)
    if extra:
        raise SchemaError(f"request: unknown top-level key(s) {sorted(extra)}")
    body = _relax(body)
    model = _validate(C.ResponsesRequest, body, "request")
    _walk(body, model, "request")
    _check_input_items(body.get("input"), model.input)


def _relax(body: dict) -> dict:
    """Apply the documented SDK-vs-reality relaxations (see ``RELAXATIONS``) to a copy."""
    body = copy.deepcopy(body)
    items = body.get("input") if isinstance(body.get("input"), list) else []
    for item in items:
        if not isinstance(item, dict):
            continue
        for key in ("content", "output"):
            parts = item.get(key)
            for part in parts if isinstance(parts, list) else []:
                if isinstance(part, dict) and part.get("type") == "input_image":
                    part.setdefault("detail", "auto")
    return body


def _check_input_items(raw: Any, val: Any) -> None:
    """Each input item's ``type`` must be the literal declared by the chosen model."""
    if not isinstance(raw, list):
        return
    for i, (item, parsed) in enumerate(zip(raw, val, strict=False)):
        declared = getattr(parsed, "type", None)
        if isinstance(item, dict) and "type" in item and item["type"] != declared:
            raise SchemaError(
                f"request.input[{i}]: type {item['type']!r} parsed as "
                f"{type(parsed).__name__} (type {declared!r})"
            )


# --------------------------------------------------------------------------- events


def known_event_types() -> frozenset[str]:
    """Event ``type`` values the SDK knows about."""
    return frozenset(_se._STREAM_EVENTS_VARIANTS)


def validate_stream_event(event: dict, *, allow_unknown: Iterable[str] = ()) -> None:
    """Validate one decoded SSE JSON payload against the SDK's ``StreamEvents`` union.

    An event whose ``type`` is unknown to the SDK fails unless it is listed in
    ``allow_unknown``.  A *known* type with a malformed payload always fails (the SDK
    would silently turn it into ``UnknownStreamEvents``; we re-validate against the
    specific variant to surface the real error).
    """
    if not isinstance(event, dict) or "type" not in event:
        raise SchemaError(f"stream event must be an object with 'type': {event!r}")
    etype = event["type"]
    variant = _se._STREAM_EVENTS_VARIANTS.get(etype)
    if variant is None:
        if etype in set(allow_unknown):
            return
        raise SchemaError(f"unknown stream event type {etype!r}")
    parsed = _validate(_se.StreamEvents, event, f"event {etype!r}")
    if _is_unknown(parsed):
        _validate(variant, event, f"event {etype!r}")  # raises with the real reason
        raise SchemaError(f"event {etype!r} fell back to UnknownStreamEvents")
    _walk(event, parsed, f"event[{etype}]")


# --------------------------------------------------------------------------- bodies


def validate_response(obj: dict) -> None:
    """Validate a non-stream ``POST /responses`` body (``OpenResponsesResult``)."""
    parsed = _validate(C.OpenResponsesResult, obj, "response")
    _walk(obj, parsed, "response")


def validate_models_list(obj: dict) -> None:
    """Validate a ``GET /models`` body (``ModelsListResponse``)."""
    parsed = _validate(C.ModelsListResponse, obj, "models list")
    _walk(obj, parsed, "models")


# --------------------------------------------------------------------------- SSE


def parse_sse(raw: bytes) -> list[dict]:
    """Reference SSE splitter: blank-line separated blocks, ``:`` comments skipped,
    ``data:`` lines joined with ``\\n``, stop at ``[DONE]``.  Tests only."""
    text = raw.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    events: list[dict] = []
    for block in text.split("\n\n"):
        data = [
            line[5:].removeprefix(" ")
            for line in block.split("\n")
            if line.startswith("data:")
        ]
        if not data:
            continue
        payload = "\n".join(data)
        if payload == "[DONE]":
            break
        events.append(json.loads(payload))
    return events
