"""The messages of contract version 1: requests the service consumes, events it publishes.

Requests are validated strictly (no type coercion, unknown fields rejected). Events are
built by the service; their JSON Schema lists every field as present (`null` when unset).
Events are open to additions (contract 1.1, see the compatibility policy in asyncapi.yaml):
a reader ignores fields it does not know, so these models and the event schemas accept
events of a newer minor version, and a field added in 1.x defaults to null when absent
(an event of an older replica during a rolling upgrade).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self, cast

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, JsonValue, model_validator
from pydantic.config import JsonDict

from contracts import examples
from contracts.enums import ErrorCode, EventKind, TaskStatus
from contracts.fields import (
    ERROR_CODE_SCHEMA,
    EVENT_KIND_SCHEMA,
    MAX_PROMPT_CHARS,
    TASK_STATUS_SCHEMA,
    BatchId,
    HttpUrl,
    Metadata,
    Prompt,
    Seed,
    Strength,
    StyleType,
    TaskId,
    UserId,
)
from contracts.ids import MAX_BATCH_SIZE

SchemaVersion = Literal[1]
STYLE_VERSION_PATTERN = r"^[0-9a-f]{8,64}$"  # 12 hex digits today; opaque to readers
# Event fields added after 1.0: absent on events of older replicas, so never `required`.
ADDED_IN_MINOR_VERSIONS = frozenset({"style_version"})
Priority = Literal["interactive", "bulk"]

_REQUEST_CONFIG = ConfigDict(extra="forbid", strict=True, frozen=True)
_EVENT_CONFIG = ConfigDict(
    extra="ignore", frozen=True, json_schema_serialization_defaults_required=True
)


def _schema_extra(documents: list[dict[str, Any]], **more: JsonValue) -> JsonDict:
    """Schema keywords for a model: its examples plus `more`."""
    # The examples are JSON documents, which mypy cannot see through dict[str, Any].
    return {"examples": cast("list[JsonValue]", documents), **more}


def _new_event_id() -> str:
    return str(uuid.uuid4())


def _utc_now() -> datetime:
    return datetime.now(UTC)


class OutputTarget(BaseModel):
    """Where to store the result instead of the service's own storage."""

    model_config = _REQUEST_CONFIG

    upload_url: HttpUrl = Field(
        description="A presigned HTTP(S) URL the service PUTs the PNG to. Events report it "
        "without its query string."
    )


class _StyleParams(BaseModel):
    """Fields shared by single and batch transform requests."""

    model_config = _REQUEST_CONFIG

    schema_version: SchemaVersion | None = Field(
        default=None, description="Contract version; absent means 1."
    )
    user_id: UserId = Field(description="The owner; the last word of every event routing key.")
    style_type: StyleType = Field(
        description="A style of the service's catalog (an unknown one fails the task with "
        "`unsupported_style`)."
    )
    custom_prompt: Prompt | None = Field(
        default=None,
        description=f"Replaces the style's preset prompt; up to {MAX_PROMPT_CHARS} characters.",
    )
    negative_prompt: Prompt | None = Field(
        default=None, description="Replaces the style's negative prompt."
    )
    strength: Strength | None = Field(
        default=None,
        description="How far to move from the photo: 0 < strength <= 1 (the sampler's denoise). "
        "Absent: the style's default.",
    )
    seed: Seed | None = Field(
        default=None,
        description="Sampler seed, 0..2^64-1 (JSON clients beyond 2^53 must write it exactly). "
        "Absent: random, reported on the events.",
    )
    metadata: Metadata | None = Field(default=None)


class TransformRequest(_StyleParams):
    """Style one image. Routing key `transform` on the requests exchange."""

    model_config = ConfigDict(
        title="TransformRequest", json_schema_extra=_schema_extra(examples.TRANSFORM_REQUEST)
    )

    task_id: TaskId | None = Field(
        default=None,
        description="Idempotency key, per user: a task_id this user_id sent before is not run "
        "twice. Absent: the AMQP message_id, else a fresh UUID4.",
    )
    image_url: HttpUrl = Field(description="The photo, fetched with GET.")
    priority: Priority | None = Field(
        default=None,
        description="`interactive` (a person waits for it) or `bulk` (background work, shared "
        "fairly between users, run on capacity interactive work leaves free). Absent: "
        "interactive on routing key `transform`, bulk on `transform.bulk`.",
    )
    output: OutputTarget | None = Field(
        default=None, description="Optional: upload the result to a URL of yours."
    )


class BatchTransformRequest(_StyleParams):
    """Style up to 50 images. Routing key `transform.batch`.

    Image `i` becomes task `{batch_id}-{i}` whose events carry batch_id and batch_index; a
    `batch.completed` event follows the last terminal task event.
    """

    model_config = ConfigDict(
        title="BatchTransformRequest",
        json_schema_extra=_schema_extra(examples.BATCH_TRANSFORM_REQUEST),
    )

    batch_id: BatchId | None = Field(
        default=None,
        description="Idempotency key of the batch, at most 60 characters so that task ids "
        "`{batch_id}-{index}` stay within 64. Absent: the AMQP message_id, else a UUID4.",
    )
    image_urls: list[HttpUrl] = Field(
        min_length=1, max_length=MAX_BATCH_SIZE, description="The photos, in order."
    )
    priority: Priority | None = Field(
        default=None,
        description="Absent or `bulk`: the tasks are bulk work, fed to the bulk queue a few "
        "at a time so that concurrent batches of different users progress interleaved. "
        "`interactive`: every task is queued at once as an interactive request.",
    )


class CancelRequest(BaseModel):
    """Cancel a task or a whole batch. Routing key `cancel`. Exactly one of task_id, batch_id."""

    model_config = ConfigDict(
        **_REQUEST_CONFIG,
        title="CancelRequest",
        json_schema_extra=_schema_extra(
            examples.CANCEL_REQUEST,
            oneOf=[
                {"required": ["task_id"], "properties": {"task_id": {"type": "string"}}},
                {"required": ["batch_id"], "properties": {"batch_id": {"type": "string"}}},
            ],
        ),
    )

    schema_version: SchemaVersion | None = Field(default=None, description="Absent means 1.")
    task_id: TaskId | None = Field(default=None, description="The task to cancel.")
    batch_id: BatchId | None = Field(default=None, description="The batch to cancel.")
    user_id: UserId = Field(description="Must be the task's owner, else nothing is cancelled.")

    @model_validator(mode="after")
    def _exactly_one_target(self) -> Self:
        if (self.task_id is None) == (self.batch_id is None):
            raise ValueError("give exactly one of task_id or batch_id")
        return self


class TaskError(BaseModel):
    """Why an attempt or a task failed."""

    model_config = _EVENT_CONFIG

    code: Annotated[ErrorCode, ERROR_CODE_SCHEMA]
    message: str = Field(description="For developers: names the URL, node, limit or input.")
    retriable: bool = Field(description="Whether the same task could succeed if sent again.")


class Timings(BaseModel):
    """Durations of the task's phases in milliseconds; null for phases not reached."""

    model_config = _EVENT_CONFIG

    queued: int | None = Field(default=None, ge=0, description="Accepted to first start.")
    download: int | None = Field(default=None, ge=0, description="Fetching the input image.")
    execute: int | None = Field(default=None, ge=0, description="Running on ComfyUI.")
    upload: int | None = Field(default=None, ge=0, description="Storing the output.")
    total: int | None = Field(default=None, ge=0, description="Accepted to this event.")


class EventRule(BaseModel):
    """The status a kind of event carries and the fields it must fill."""

    model_config = ConfigDict(frozen=True)

    status: TaskStatus
    required: tuple[str, ...] = ()


EVENT_RULES: Mapping[EventKind, EventRule] = MappingProxyType(
    {
        EventKind.ACCEPTED: EventRule(status=TaskStatus.PENDING),
        EventKind.STARTED: EventRule(status=TaskStatus.PROCESSING, required=("instance",)),
        EventKind.PROGRESS: EventRule(status=TaskStatus.PROCESSING),
        EventKind.RETRYING: EventRule(status=TaskStatus.PROCESSING, required=("error",)),
        EventKind.COMPLETED: EventRule(
            status=TaskStatus.COMPLETED, required=("output_image_url", "output_image_urls")
        ),
        EventKind.FAILED: EventRule(status=TaskStatus.FAILED, required=("error",)),
        EventKind.CANCELLED: EventRule(status=TaskStatus.CANCELLED),
    }
)


def _rules_schema() -> list[JsonValue]:
    """EVENT_RULES as JSON Schema if/then clauses."""
    return [
        {
            "if": {"properties": {"event": {"const": kind.value}}, "required": ["event"]},
            "then": {
                "properties": {
                    "status": {"const": rule.status.value},
                    **{name: {"not": {"type": "null"}} for name in rule.required},
                },
                "required": ["status", *rule.required],
            },
        }
        for kind, rule in EVENT_RULES.items()
    ]


def _task_event_schema(schema: JsonDict) -> None:
    """TaskEvent's examples and rules; a field added in a minor version is not required."""
    schema.update(_schema_extra(examples.TASK_EVENT, allOf=_rules_schema()))
    required = cast("list[str]", schema.get("required", []))
    schema["required"] = [name for name in required if name not in ADDED_IN_MINOR_VERSIONS]


class TaskEvent(BaseModel):
    """A task's lifecycle event, on the events exchange with routing key `task.<event>.<user_id>`.

    Terminal events (completed, failed, cancelled) are also sent to the request's `reply_to`
    queue with its `correlation_id`. Delivery is at least once: drop repeats by `event_id`.
    """

    model_config = ConfigDict(
        **_EVENT_CONFIG,
        title="TaskEvent",
        json_schema_extra=_task_event_schema,
    )

    schema_version: SchemaVersion = Field(default=1, description="Contract version.")
    event: Annotated[EventKind, EVENT_KIND_SCHEMA]
    event_id: TaskId = Field(
        default_factory=_new_event_id,
        description="Unique per publication; a redelivered event keeps it (deduplicate on it).",
    )
    task_id: TaskId = Field(description="The task; `{batch_id}-{index}` for batch tasks.")
    user_id: UserId = Field(description="The owner, as in the request.")
    batch_id: BatchId | None = Field(default=None, description="Set for tasks of a batch.")
    batch_index: int | None = Field(
        default=None, ge=0, lt=MAX_BATCH_SIZE, description="The image's index in its batch."
    )
    style_type: StyleType | None = Field(default=None, description="As in the request.")
    style_version: str | None = Field(
        default=None,
        pattern=STYLE_VERSION_PATTERN,
        description="The version of the style that runs the task (since 1.1): a content hash "
        "of its workflow and defaults, changed by any edit of the style. Compare for equality "
        "only. A task keeps it from acceptance to its terminal event; a redelivered task runs "
        "with the version in use then. Null when the request was refused before its style "
        "was resolved (and on events of replicas older than 1.1).",
    )
    status: Annotated[TaskStatus, TASK_STATUS_SCHEMA]
    progress: int = Field(ge=0, le=100, description="Percent done, never decreasing per attempt.")
    attempt: int = Field(
        ge=1,
        description="The attempt this event belongs to: 1 for the first try; on `retrying`, "
        "the attempt about to run.",
    )
    seed: Seed | None = Field(default=None, description="The seed used (random if not given).")
    instance: str | None = Field(
        default=None, max_length=255, description="The ComfyUI instance running the attempt."
    )
    output_image_url: str | None = Field(default=None, description="Where the result is.")
    output_image_urls: list[str] | None = Field(
        default=None, description="Every output image, the first being output_image_url."
    )
    error: TaskError | None = Field(
        default=None, description="Why it failed: set on failed and retrying events."
    )
    timings_ms: Timings | None = Field(
        default=None, description="Phase durations so far; set at least on terminal events."
    )
    metadata: Metadata | None = Field(default=None, description="The request's metadata.")
    created_at: AwareDatetime = Field(description="When the task was accepted (RFC 3339).")
    timestamp: AwareDatetime = Field(
        default_factory=_utc_now, description="When this event was produced (RFC 3339)."
    )

    @model_validator(mode="after")
    def _follows_event_rules(self) -> Self:
        rule = EVENT_RULES[self.event]
        if self.status != rule.status:
            raise ValueError(f"a {self.event.value!r} event has status {rule.status.value!r}")
        missing = [name for name in rule.required if getattr(self, name) is None]
        if missing:
            raise ValueError(f"a {self.event.value!r} event needs {', '.join(missing)}")
        return self


class BatchCompletedEvent(BaseModel):
    """Every task of a batch reached a terminal event. Routing key `batch.completed.<user_id>`.

    completed + failed + cancelled equals the number of task_ids.
    """

    model_config = ConfigDict(
        **_EVENT_CONFIG,
        title="BatchCompletedEvent",
        json_schema_extra=_schema_extra(examples.BATCH_COMPLETED_EVENT),
    )

    schema_version: SchemaVersion = Field(default=1, description="Contract version.")
    event: Literal["batch.completed"] = Field(
        default="batch.completed", description="Always `batch.completed`."
    )
    event_id: TaskId = Field(default_factory=_new_event_id, description="Deduplicate on it.")
    batch_id: BatchId = Field(description="The batch.")
    user_id: UserId = Field(description="The owner, as in the request.")
    style_type: StyleType = Field(description="As in the request.")
    task_ids: list[TaskId] = Field(
        min_length=1, max_length=MAX_BATCH_SIZE, description="In image order."
    )
    completed: int = Field(ge=0, description="Tasks that ended `completed`.")
    failed: int = Field(ge=0, description="Tasks that ended `failed`.")
    cancelled: int = Field(ge=0, description="Tasks that ended `cancelled`.")
    metadata: Metadata | None = Field(default=None, description="The request's metadata.")
    timestamp: AwareDatetime = Field(
        default_factory=_utc_now, description="When this event was produced (RFC 3339)."
    )

    @model_validator(mode="after")
    def _counts_add_up(self) -> Self:
        total = self.completed + self.failed + self.cancelled
        if total != len(self.task_ids):
            raise ValueError(f"counts add up to {total}, but there are {len(self.task_ids)} tasks")
        return self


Request = TransformRequest | BatchTransformRequest | CancelRequest
Event = TaskEvent | BatchCompletedEvent
