"""The message contract between app backends and the style consumer (schema version 1)."""

from contracts.decode import InvalidMessage, decode_event, decode_request
from contracts.enums import TERMINAL_EVENTS, ErrorCode, EventKind, TaskStatus
from contracts.ids import (
    ID_PATTERN,
    USER_ID_PATTERN,
    batch_completed_routing_key,
    batch_task_id,
    is_valid_id,
    routing_key,
    task_event_routing_key,
)
from contracts.models import (
    BatchCompletedEvent,
    BatchTransformRequest,
    CancelRequest,
    Event,
    OutputTarget,
    Request,
    TaskError,
    TaskEvent,
    Timings,
    TransformRequest,
)

SCHEMA_VERSION = 1

__all__ = [
    "ID_PATTERN",
    "SCHEMA_VERSION",
    "TERMINAL_EVENTS",
    "USER_ID_PATTERN",
    "BatchCompletedEvent",
    "BatchTransformRequest",
    "CancelRequest",
    "ErrorCode",
    "Event",
    "EventKind",
    "InvalidMessage",
    "OutputTarget",
    "Request",
    "TaskError",
    "TaskEvent",
    "TaskStatus",
    "Timings",
    "TransformRequest",
    "batch_completed_routing_key",
    "batch_task_id",
    "decode_event",
    "decode_request",
    "is_valid_id",
    "routing_key",
    "task_event_routing_key",
]
