"""The message contract between app backends and the style consumer (schema version 1)."""

from contracts.enums import TERMINAL_EVENTS, ErrorCode, EventKind, TaskStatus

SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "TERMINAL_EVENTS", "ErrorCode", "EventKind", "TaskStatus"]
