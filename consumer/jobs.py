"""A task in flight: what was asked, where it stands, and the events that describe it.

The delivery is only a handle on a job: a redelivered copy of a running task adds its
handle here, and every handle is settled (`consumer.settle`) when the job ends.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from aio_pika.abc import AbstractIncomingMessage

from consumer.comfy.scheduling import Demand, Priority
from consumer.state import task_key
from consumer.workflows import Style
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.models import TaskError, TaskEvent, Timings, TransformRequest

if TYPE_CHECKING:
    from consumer.comfy import PromptRun
    from consumer.settle import Action

STATUS_OF_EVENT = {
    EventKind.ACCEPTED: TaskStatus.PENDING,
    EventKind.STARTED: TaskStatus.PROCESSING,
    EventKind.PROGRESS: TaskStatus.PROCESSING,
    EventKind.RETRYING: TaskStatus.PROCESSING,
    EventKind.COMPLETED: TaskStatus.COMPLETED,
    EventKind.FAILED: TaskStatus.FAILED,
    EventKind.CANCELLED: TaskStatus.CANCELLED,
}


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Reply:
    """Where a request asked for its terminal event (already allowed by the reply policy)."""

    reply_to: str
    correlation_id: str | None


@dataclass(frozen=True)
class BatchRef:
    """Where a task sits in its batch; carried in AMQP headers of expanded requests."""

    batch_id: str
    index: int
    size: int


@dataclass
class Job:
    """One task this replica is running."""

    task_id: str
    request: TransformRequest
    style: Style
    seed: int
    batch: BatchRef | None = None
    reply: Reply | None = None
    created_at: datetime = field(default_factory=utcnow)
    accepted_at: float = field(default_factory=time.monotonic)  # this delivery's acceptance
    attempt: int = 1
    instance: str | None = None
    progress: int = 0
    cancel_requested: bool = False
    prompt_id: str | None = None
    run: PromptRun | None = None  # the prompt on its instance, from submit until it ends
    settling: bool = False  # its ending is being performed: a cancel comes too late
    action: Action | None = None  # how its deliveries ended
    previous_prompt: tuple[str, str] | None = None  # (instance, prompt_id) of an earlier run
    timings_ms: dict[str, int] = field(default_factory=dict)
    handles: list[AbstractIncomingMessage] = field(default_factory=list)
    priority: Priority = Priority.INTERACTIVE

    @property
    def demand(self) -> Demand:
        """What the task asks of the pool: node classes, models, class and owner."""
        return Demand(
            self.style.required_node_classes, self.style.models, self.priority, self.user_id
        )

    @property
    def user_id(self) -> str:
        return self.request.user_id

    @property
    def key(self) -> str:
        """Where the task lives in the store: task ids are scoped by their user."""
        return task_key(self.user_id, self.task_id)

    @property
    def prompt(self) -> str:
        return self.request.custom_prompt or self.style.prompt

    @property
    def negative_prompt(self) -> str:
        return self.request.negative_prompt or self.style.negative_prompt

    @property
    def strength(self) -> float:
        return self.request.strength if self.request.strength is not None else self.style.strength

    def log_fields(self) -> dict[str, Any]:
        """The context every log line about this task carries."""
        return {
            "task_id": self.task_id,
            "user_id": self.user_id,
            "style_type": self.style.name,
            "style_version": self.style.version,
            "instance": self.instance,
            "attempt": self.attempt,
        }

    def event(self, kind: EventKind, **fields: Any) -> TaskEvent:
        """A TaskEvent for this job, with everything known so far."""
        now = utcnow()
        base: dict[str, Any] = {
            "event": kind,
            "event_id": uuid.uuid4().hex,
            "task_id": self.task_id,
            "user_id": self.user_id,
            "batch_id": self.batch.batch_id if self.batch else None,
            "batch_index": self.batch.index if self.batch else None,
            "style_type": self.style.name,
            "style_version": self.style.version,
            "status": STATUS_OF_EVENT[kind],
            "progress": 100 if kind is EventKind.COMPLETED else self.progress,
            "attempt": self.attempt,
            "seed": self.seed,
            "instance": self.instance,
            "metadata": self.request.metadata,
            "timings_ms": Timings(**self.timings_ms) if self.timings_ms else None,
            "created_at": self.created_at,
            "timestamp": now,
        }
        base.update(fields)
        return TaskEvent(**base)

    def error_event(
        self, kind: EventKind, code: ErrorCode, message: str, *, retriable: bool
    ) -> TaskEvent:
        error = TaskError(code=code, message=message, retriable=retriable)
        return self.event(kind, error=error)
