"""The closed vocabularies of the contract: event kinds, task statuses and error codes.

Every value here is part of the public contract. Adding one is a minor version of the
contract; renaming or removing one is a breaking change.
"""

from enum import StrEnum


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
