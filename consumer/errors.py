"""The service's exceptions, split by what the caller does next.

    ConsumerError                      every error of ours; carries a stable `code`
    ├── PermanentError                 retrying cannot help: the task ends as `failed`
    │   ├── InvalidRequest             invalid_request       the message breaks the contract
    │   ├── UnsupportedStyle           unsupported_style     no such style in the manifest
    │   ├── ImageUrlForbidden          image_url_forbidden   scheme, or SSRF guard refused the host
    │   ├── ImageDownloadFailed        image_download_failed 4xx, too many redirects, bad body
    │   ├── ImageTooLarge              image_too_large       bytes or pixels over the limits
    │   ├── ImageInvalid               image_invalid         not an image Pillow can decode
    │   ├── WorkflowInvalid            workflow_invalid      template/manifest broken, or an
    │   │                                                    instance lacks a node class
    │   ├── ComfyRejected              comfyui_rejected      POST /prompt answered 400
    │   ├── ComfyExecutionError        comfyui_execution_error  execution_error from a node
    │   ├── TaskTimeout                timeout               ran past TASK_TIMEOUT_S
    │   ├── TaskCancelled              cancelled             the owner asked to cancel
    │   └── OutputUploadFailed         output_upload_failed  storing the result failed
    └── TransientError                 retry, on another instance when there is one
        ├── InstanceUnavailable        the instance died, restarted, refused or 5xx'd
        │   └── InstanceStuck          timeout  a prompt did not finish in EXECUTION_TIMEOUT_S
        ├── BrokerUnavailable          the broker did not confirm in time (nack + requeue)
        └── DiscoveryFailed            a DNS look-up of instances failed: the last answer stays

`internal_error` is the code of anything that is not a ConsumerError (a bug). A transient
error that exhausts MAX_ATTEMPTS ends the task as `failed` with its own code.
"""

from __future__ import annotations

from typing import ClassVar

from contracts.enums import ErrorCode


class ConsumerError(Exception):
    """Base of every error the service raises on purpose."""

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL_ERROR
    retriable: ClassVar[bool] = False

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PermanentError(ConsumerError):
    """Retrying the same task cannot succeed."""


class TransientError(ConsumerError):
    """The same task may succeed if tried again, preferably elsewhere."""

    retriable = True


class InvalidRequest(PermanentError):
    code = ErrorCode.INVALID_REQUEST


class UnsupportedStyle(PermanentError):
    code = ErrorCode.UNSUPPORTED_STYLE


class ImageUrlForbidden(PermanentError):
    code = ErrorCode.IMAGE_URL_FORBIDDEN


class ImageDownloadFailed(PermanentError):
    code = ErrorCode.IMAGE_DOWNLOAD_FAILED


class ImageTooLarge(PermanentError):
    code = ErrorCode.IMAGE_TOO_LARGE


class ImageInvalid(PermanentError):
    code = ErrorCode.IMAGE_INVALID


class WorkflowInvalid(PermanentError):
    code = ErrorCode.WORKFLOW_INVALID


class ComfyRejected(PermanentError):
    code = ErrorCode.COMFYUI_REJECTED


class ComfyExecutionError(PermanentError):
    code = ErrorCode.COMFYUI_EXECUTION_ERROR


class TaskTimeout(PermanentError):
    code = ErrorCode.TIMEOUT


class TaskCancelled(PermanentError):
    code = ErrorCode.CANCELLED


class OutputUploadFailed(PermanentError):
    code = ErrorCode.OUTPUT_UPLOAD_FAILED


class InstanceUnavailable(TransientError):
    """An instance could not run the prompt: gone, restarted, 5xx, timed out before running."""

    code = ErrorCode.INTERNAL_ERROR


class BrokerUnavailable(TransientError):
    """The broker did not confirm a publication in time."""

    code = ErrorCode.INTERNAL_ERROR


class InstanceStuck(InstanceUnavailable):
    """A prompt did not finish within EXECUTION_TIMEOUT_S: interrupted, tried elsewhere."""

    code = ErrorCode.TIMEOUT


class DiscoveryFailed(TransientError):
    """Resolving a `discover` entry of the instance list failed (timeout, SERVFAIL, no
    resolver): the membership keeps that entry's last answer and asks again later."""

    code = ErrorCode.INTERNAL_ERROR
