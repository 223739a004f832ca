"""Turn raw AMQP bodies into contract models, or into one readable InvalidMessage."""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from contracts.fields import PATTERN_HINTS
from contracts.ids import USER_ID_PATTERN, is_valid_id
from contracts.models import (
    BatchCompletedEvent,
    BatchTransformRequest,
    CancelRequest,
    Event,
    Request,
    TaskEvent,
    TransformRequest,
)

REQUEST_MODELS: Mapping[str, type[TransformRequest | BatchTransformRequest | CancelRequest]] = (
    MappingProxyType(
        {
            "transform": TransformRequest,
            "transform.batch": BatchTransformRequest,
            "transform.bulk": TransformRequest,
            "transform.batch.bulk": BatchTransformRequest,
            "cancel": CancelRequest,
        }
    )
)
"""Routing key on the requests exchange -> the model of its body."""

MAX_REPORTED_ERRORS = 10
MAX_INT_DIGITS = 40  # the largest field (a 64-bit seed) has 20
MAX_DEPTH = 64  # a request is a few levels deep; metadata may nest a little
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")
_MAX_SHOWN_INPUT_CHARS = 60


class InvalidMessage(ValueError):
    """The message breaks the contract. `user_id` is the sender's, when it could be read."""

    def __init__(self, message: str, user_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.user_id = user_id


def decode_request(routing_key: str, body: bytes, max_bytes: int | None = None) -> Request:
    """Validate the body of a request sent with `routing_key`, or raise InvalidMessage."""
    if max_bytes is not None and len(body) > max_bytes:
        raise InvalidMessage(f"message is {len(body)} bytes, over the limit of {max_bytes}")
    document = parse_json_object(body)
    user_id = _user_id_of(document)
    model = REQUEST_MODELS.get(routing_key)
    if model is None:
        known = ", ".join(sorted(REQUEST_MODELS))
        raise InvalidMessage(
            f"unknown routing key {routing_key!r} (expected one of: {known})", user_id
        )
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid {routing_key} request: {summarise(exc)}", user_id) from exc


def decode_event(body: bytes) -> Event:
    """Validate an event body (for app backends written in Python, and for tests)."""
    document = parse_json_object(body)
    model = BatchCompletedEvent if document.get("event") == "batch.completed" else TaskEvent
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        raise InvalidMessage(f"invalid event: {summarise(exc)}", _user_id_of(document)) from exc


def parse_json_object(body: bytes) -> dict[str, Any]:
    """Strict JSON: UTF-8, no NaN/Infinity, no duplicate keys, an object at the top, at most
    MAX_DEPTH levels deep, and no text that cannot be written back as UTF-8."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"body is not UTF-8: byte {exc.start} is invalid") from exc
    _check_depth(text)
    try:
        document = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_int=_bounded_int,
            object_pairs_hook=_unique_keys,
        )
    except json.JSONDecodeError as exc:
        raise InvalidMessage(
            f"body is not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise InvalidMessage(f"body is not JSON: {_escaped(str(exc))}") from exc
    if not isinstance(document, dict):
        raise InvalidMessage(f"body must be a JSON object, not {_json_type(document)}")
    try:
        _check_values(document)
    except InvalidMessage as exc:
        raise InvalidMessage(exc.message, _user_id_of(document)) from None
    return document


def _check_depth(text: str) -> None:
    """Refuse deep nesting before parsing (the parser would recurse into it)."""
    depth = 0
    for char in _BRACKETS.findall(_STRINGS.sub('""', text)):
        depth += 1 if char in "[{" else -1
        if depth > MAX_DEPTH:
            raise InvalidMessage(f"body is nested deeper than {MAX_DEPTH} levels")


def _check_values(document: dict[str, Any]) -> None:
    """Refuse numbers out of range, and strings (keys or values) holding a lone UTF-16
    surrogate, e.g. `"\\ud800"`.

    JSON allows the escape, Python decodes it, but no UTF-8 encoder can write it back: in an
    event, a log line or a header it would fail later, far from here. Mobile clients send it
    by accident when they cut a string inside an emoji.
    """
    pending: list[tuple[str, object]] = [("", document)]
    while pending:
        path, value = pending.pop()
        if isinstance(value, str):
            _check_string(value, path)
        elif isinstance(value, _OutOfRange) or (
            isinstance(value, float) and not math.isfinite(value)
        ):
            raise InvalidMessage(f"{_escaped(path)}: number is out of range")
        elif isinstance(value, dict):
            for key, item in value.items():
                _check_string(key, f"{path} (a key)" if path else "a key")
                pending.append((f"{path}.{key}" if path else key, item))
        elif isinstance(value, list):
            pending.extend((f"{path}[{i}]", item) for i, item in enumerate(value))


def _check_string(value: str, path: str) -> None:
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = _escaped(path) or "the message"
        raise InvalidMessage(
            f"{where}: text holds a lone UTF-16 surrogate at character {exc.start}"
            " (a string cut inside an emoji?); send valid Unicode"
        ) from None


def _escaped(text: str) -> str:
    """`text` writable as UTF-8: lone surrogates become `\\udXXX` escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


class _OutOfRange:
    """A number no field can hold (over MAX_INT_DIGITS digits), refused after parsing."""

    def __init__(self, text: str) -> None:
        self.text = text


def _bounded_int(text: str) -> int | _OutOfRange:
    return _OutOfRange(text) if len(text) > MAX_INT_DIGITS else int(text)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    document = dict(pairs)
    if len(document) != len(pairs):
        counts = Counter(key for key, _ in pairs)
        duplicates = sorted(key for key, count in counts.items() if count > 1)
        raise ValueError(f"duplicate key {', '.join(map(repr, duplicates))}")
    return document


def _json_type(value: object) -> str:
    names = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _user_id_of(document: Mapping[str, Any]) -> str | None:
    user_id = document.get("user_id")
    return user_id if is_valid_id(user_id, USER_ID_PATTERN) else None


def summarise(exc: ValidationError) -> str:
    """One line per problem, joined by '; ': `path: what is wrong (got value)`."""
    errors = exc.errors(include_url=False)
    lines = [_describe(error, exc.title) for error in errors[:MAX_REPORTED_ERRORS]]
    if len(errors) > MAX_REPORTED_ERRORS:
        lines.append(f"and {len(errors) - MAX_REPORTED_ERRORS} more")
    return "; ".join(lines)


def _describe(error: ErrorDetails, title: str) -> str:
    path = format_path(error["loc"]) or f"{title} (whole message)"
    kind = error["type"]
    if kind == "missing":
        return f"{path}: required field is missing"
    if kind == "extra_forbidden":
        return f"{path}: unknown field"
    shown = _shown(error["input"])
    got = f" (got {shown})" if shown else ""
    return f"{path}: {_message(error)}{got}"


def _message(error: ErrorDetails) -> str:
    ctx = error.get("ctx") or {}
    if error["type"] == "value_error" and "error" in ctx:
        return str(ctx["error"])
    if error["type"] == "string_pattern_mismatch":
        return PATTERN_HINTS.get(str(ctx.get("pattern")), error["msg"])
    return error["msg"]


def format_path(loc: Sequence[int | str]) -> str:
    """('image_urls', 2) -> 'image_urls[2]'; ('output', 'upload_url') -> 'output.upload_url'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}" if path else part
    return path


def _shown(value: object) -> str:
    """The offending input as JSON, shortened; empty for whole objects."""
    if isinstance(value, BaseModel | Mapping):
        return ""
    text = _escaped(json.dumps(value, ensure_ascii=False, default=str))
    if len(text) <= _MAX_SHOWN_INPUT_CHARS:
        return text
    return text[: _MAX_SHOWN_INPUT_CHARS - 3] + "..."
