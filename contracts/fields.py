"""Constrained field types shared by the request and event models.

Each type carries its own JSON Schema, so the published schema says what the model checks.
The few checks JSON Schema cannot state (URL host, metadata size) say so in a description.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Annotated, TypeVar
from urllib.parse import urlsplit

from pydantic import AfterValidator, Field, JsonValue, WithJsonSchema

from contracts.enums import ERROR_CODE_MEANINGS, EVENT_MEANINGS, STATUS_MEANINGS
from contracts.ids import (
    BATCH_ID_PATTERN,
    ID_PATTERN,
    MAX_BATCH_ID_CHARS,
    MAX_ID_CHARS,
    STYLE_TYPE_PATTERN,
    USER_ID_PATTERN,
)

MAX_URL_CHARS = 2048
MAX_PROMPT_CHARS = 2000
MAX_METADATA_BYTES = 4096
MAX_SEED = 0xFFFF_FFFF_FFFF_FFFF
HTTP_URL_PATTERN = r"^https?://[^\s/?#]+(?:[/?#]\S*)?$"


PATTERN_HINTS: Mapping[str, str] = MappingProxyType(
    {
        ID_PATTERN: f"must be 1-{MAX_ID_CHARS} letters, digits, '_', '.', ':' or '-'",
        BATCH_ID_PATTERN: f"must be 1-{MAX_BATCH_ID_CHARS} letters, digits, '_', '.', ':' or '-'",
        USER_ID_PATTERN: f"must be 1-{MAX_ID_CHARS} letters, digits, '_' or '-'",
        STYLE_TYPE_PATTERN: "must be 1-64 lowercase letters, digits or '_'",
        HTTP_URL_PATTERN: "must be an http:// or https:// URL without spaces",
    }
)
"""Plain words for each pattern, used in validation error messages."""


def _http_url(value: str) -> str:
    try:
        host = urlsplit(value).hostname
    except ValueError as exc:
        raise ValueError(f"not a valid URL: {exc}") from exc
    if not host:
        raise ValueError("the URL has no host")
    return value


def compact_json_bytes(value: object) -> int:
    """The size of `value` serialized as compact UTF-8 JSON, as the metadata limit counts it."""
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())


def _small_metadata(value: dict[str, JsonValue]) -> dict[str, JsonValue]:
    size_bytes = compact_json_bytes(value)
    if size_bytes > MAX_METADATA_BYTES:
        raise ValueError(
            f"metadata is {size_bytes} bytes as compact JSON, over the limit of "
            f"{MAX_METADATA_BYTES}"
        )
    return value


TaskId = Annotated[str, Field(pattern=ID_PATTERN, max_length=MAX_ID_CHARS)]
BatchId = Annotated[str, Field(pattern=BATCH_ID_PATTERN, max_length=MAX_BATCH_ID_CHARS)]
UserId = Annotated[str, Field(pattern=USER_ID_PATTERN, max_length=MAX_ID_CHARS)]
StyleType = Annotated[str, Field(pattern=STYLE_TYPE_PATTERN, max_length=64)]
HttpUrl = Annotated[
    str,
    Field(pattern=HTTP_URL_PATTERN, max_length=MAX_URL_CHARS, json_schema_extra={"format": "uri"}),
    AfterValidator(_http_url),
]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Strength = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Metadata = Annotated[
    dict[str, JsonValue],
    AfterValidator(_small_metadata),
    WithJsonSchema(
        {
            "type": "object",
            "description": "Any JSON object of the sender's, at most "
            f"{MAX_METADATA_BYTES} bytes as compact UTF-8 JSON; echoed unchanged on every event.",
        }
    ),
]


_E = TypeVar("_E", bound=StrEnum)


def _documented_enum(title: str, intro: str, meanings: Mapping[_E, str]) -> WithJsonSchema:
    lines = [intro, ""] + [f"- `{member.value}`: {text}" for member, text in meanings.items()]
    values = [member.value for member in meanings]
    return WithJsonSchema(
        {"title": title, "type": "string", "enum": values, "description": "\n".join(lines)}
    )


ERROR_CODE_SCHEMA = _documented_enum(
    "ErrorCode", "Why a task failed (a closed set):", ERROR_CODE_MEANINGS
)
EVENT_KIND_SCHEMA = _documented_enum(
    "EventKind",
    "The kind of task event, also the `<event>` word of the routing key:",
    EVENT_MEANINGS,
)
TASK_STATUS_SCHEMA = _documented_enum("TaskStatus", "The task's status:", STATUS_MEANINGS)
