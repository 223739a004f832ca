"""Logging set-up: one JSON line per event (text when DEBUG), with task context fields.

Callers pass context through `extra={"ctx": {...}}`; `task_fields()` builds the usual set.
A line logged inside a trace (a task's, a delivery's) also carries its `trace_id`/`span_id`.
"""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any

import orjson

from consumer.tracing import log_ids

_CONTEXT_KEY = "ctx"
_TRACE_KEY = "trace"


class TraceIds(logging.Filter):
    """Stamps a record with the current span's ids, where it is logged (formatting may be later)."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = log_ids()
        if ids:
            setattr(record, _TRACE_KEY, ids)
        return True


class JsonFormatter(logging.Formatter):
    """Render a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        line.update(getattr(record, _CONTEXT_KEY, None) or {})
        line.update(getattr(record, _TRACE_KEY, None) or {})
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(line, default=str).decode()


class TextFormatter(logging.Formatter):
    """Human-readable lines for DEBUG runs, context appended as key=value."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        ctx = getattr(record, _CONTEXT_KEY, None) or {}
        extras = " ".join(f"{key}={value}" for key, value in ctx.items() if value is not None)
        return f"{text} {extras}" if extras else text


def configure_logging(level: str, *, debug: bool) -> None:
    """Install one stderr handler on the root logger."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter() if debug else JsonFormatter())
    handler.addFilter(TraceIds())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiormq").setLevel(max(logging.WARNING, root.level))
    logging.getLogger("aio_pika").setLevel(max(logging.WARNING, root.level))


def ctx(**fields: Any) -> dict[str, Any]:
    """The `extra=` argument carrying context fields, dropping the unknown ones."""
    return {_CONTEXT_KEY: {key: value for key, value in fields.items() if value is not None}}
