"""The closed vocabularies of the contract: event kinds, task statuses and error codes.

Every value here is part of the public contract (see the compatibility policy in
asyncapi.yaml). Adding an error code or a non-terminal event kind is a minor version of the
contract (readers ignore kinds they do not know and act on an unknown code's `retriable`);
adding a task status or a terminal event kind, renaming or removing any value is a new major.
"""

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType


class EventKind(StrEnum):
    """The `<event>` part of a task event's routing key `task.<event>.<user_id>`."""

    ACCEPTED = "accepted"
    STARTED = "started"
    PROGRESS = "progress"
    RETRYING = "retrying"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_EVENTS

    @property
    def meaning(self) -> str:
        """What this event tells its subscribers (documented in the JSON Schema)."""
        return EVENT_MEANINGS[self]


TERMINAL_EVENTS = frozenset({EventKind.COMPLETED, EventKind.FAILED, EventKind.CANCELLED})


class TaskStatus(StrEnum):
    """A task's status, as the original HTTP design named them."""

    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in {TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED}

    @property
    def meaning(self) -> str:
        """What this status says about the task (documented in the JSON Schema)."""
        return STATUS_MEANINGS[self]


class ErrorCode(StrEnum):
    """Why a task failed or a message was dead-lettered. A closed, documented set."""

    INVALID_REQUEST = "invalid_request"
    UNSUPPORTED_STYLE = "unsupported_style"
    IMAGE_URL_FORBIDDEN = "image_url_forbidden"
    IMAGE_DOWNLOAD_FAILED = "image_download_failed"
    IMAGE_TOO_LARGE = "image_too_large"
    IMAGE_INVALID = "image_invalid"
    WORKFLOW_INVALID = "workflow_invalid"
    COMFYUI_REJECTED = "comfyui_rejected"
    COMFYUI_EXECUTION_ERROR = "comfyui_execution_error"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    OUTPUT_UPLOAD_FAILED = "output_upload_failed"
    INTERNAL_ERROR = "internal_error"

    @property
    def meaning(self) -> str:
        """What went wrong, in words an app developer can act on (documented in the JSON Schema)."""
        return ERROR_CODE_MEANINGS[self]


EVENT_MEANINGS: Mapping[EventKind, str] = MappingProxyType(
    {
        EventKind.ACCEPTED: "the request passed validation and the task is queued",
        EventKind.STARTED: "an attempt began on the ComfyUI instance named in `instance`",
        EventKind.PROGRESS: "the running attempt reached `progress` percent (throttled)",
        EventKind.RETRYING: "the attempt failed with a retriable `error`; the task will run again",
        EventKind.COMPLETED: "terminal: the styled image is stored at `output_image_url`",
        EventKind.FAILED: "terminal: the task gave up; `error` says why",
        EventKind.CANCELLED: "terminal: the owner cancelled the task before it finished",
    }
)

STATUS_MEANINGS: Mapping[TaskStatus, str] = MappingProxyType(
    {
        TaskStatus.PENDING: "accepted, waiting for a free ComfyUI slot",
        TaskStatus.PROCESSING: "running on a ComfyUI instance, or between two attempts",
        TaskStatus.COMPLETED: "finished; the output is stored",
        TaskStatus.FAILED: "finished without an output",
        TaskStatus.CANCELLED: "stopped at the owner's request",
    }
)

ERROR_CODE_MEANINGS: Mapping[ErrorCode, str] = MappingProxyType(
    {
        ErrorCode.INVALID_REQUEST: "the message breaks this contract (bad JSON, unknown or "
        "missing field, value out of range); fix the sender",
        ErrorCode.UNSUPPORTED_STYLE: "`style_type` names no style the service knows",
        ErrorCode.IMAGE_URL_FORBIDDEN: "the image URL's scheme or host is refused (only http(s); "
        "private and loopback addresses are blocked unless allowed)",
        ErrorCode.IMAGE_DOWNLOAD_FAILED: "the image URL answered an error status, redirected too "
        "often, timed out or sent a broken body",
        ErrorCode.IMAGE_TOO_LARGE: "the image exceeds the service's byte or pixel limits",
        ErrorCode.IMAGE_INVALID: "the downloaded bytes are not an image the service can decode",
        ErrorCode.WORKFLOW_INVALID: "the style's workflow is broken or no instance has the node "
        "classes it needs (an operator problem)",
        ErrorCode.COMFYUI_REJECTED: "ComfyUI refused the rendered workflow (HTTP 400 on /prompt)",
        ErrorCode.COMFYUI_EXECUTION_ERROR: "a ComfyUI node raised an error while executing",
        ErrorCode.TIMEOUT: "the task ran past the service's task deadline",
        ErrorCode.CANCELLED: "the owner cancelled the task",
        ErrorCode.OUTPUT_UPLOAD_FAILED: "storing the result failed (for example the presigned "
        "upload URL refused the PUT)",
        ErrorCode.INTERNAL_ERROR: "a fault inside the service, or a retriable failure (instance "
        "or broker unavailable) that used up every attempt",
    }
)
