"""Where a task's state lives between its events: one Protocol, one rule set, two stores.

A record belongs to its user: it is stored under `task_key(user_id, task_id)`, so two users
may use the same task id and neither can claim the other's. Reads, updates and leases take
that key; `find` is the one way from a bare task id to the records (of any user) that use it.

`apply_changes` is the one place that says how a record may change; both stores call it
inside their atomic step (a plain method call for memory, WATCH/MULTI for Redis):

- A task in a terminal status never changes again. Re-setting the same terminal data is a
  no-op that returns the stored record (a redelivery); any other change is refused (None).
- Within one attempt progress never goes down (a late, lower value is ignored). A higher
  attempt starts again from 0 unless it says otherwise; a lower attempt is refused.
- `task_id`, `user_id` and `created_at` never change.

Records expire `ttl_s` after they were created (TASK_CLEANUP_HOURS); updates keep the expiry.
Leases (`acquire_lease` and friends) say which consumer runs a task; they expire on their own.

Two kinds of bookkeeping live beside the records, and expire after `ttl_s` as they do:

- Early cancels (`add_cancel`): a cancel for a task id not seen yet is remembered for the
  user who sent it, never as a record, so it creates nothing the user's real request would
  find in its way. At most MAX_CANCELS_PER_USER per user; the oldest go first.
- Batch completion (`end_batch_task`): the set of a batch's ended task ids, counted
  atomically, plus a claim that lets exactly one caller announce the complete batch. The
  batch id is any string (callers make it per user with `task_key(user_id, batch_id)`). An
  unconfirmed claim lapses after `claim_ttl_s` (the announcer died), so a later call may
  announce instead; `confirm_batch_announced` keeps it for good (`ttl_s`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from contracts.enums import TaskStatus
from contracts.models import TaskError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "MAX_CANCELS_PER_USER",
    "MemoryTaskStore",
    "RedisTaskStore",
    "TaskCounts",
    "TaskRecord",
    "TaskStateStore",
    "apply_changes",
    "task_key",
    "utcnow",
]

IMMUTABLE_FIELDS = frozenset({"task_id", "user_id", "created_at"})
MAX_CANCELS_PER_USER = 1000  # early cancels remembered per user; the oldest are dropped


def utcnow() -> datetime:
    return datetime.now(UTC)


def task_key(user_id: str, task_id: str) -> str:
    """Where the user's task is stored. Neither id may hold a "/" (the contracts' patterns
    forbid it), so the key names exactly one (user, task) pair."""
    return f"{user_id}/{task_id}"


class TaskRecord(BaseModel):
    """What the service remembers about one task."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    task_id: str
    user_id: str
    style_type: str
    style_version: str | None = None  # of the run that made (or makes) the output
    status: TaskStatus = TaskStatus.PENDING
    progress: int = Field(default=0, ge=0, le=100)
    attempt: int = Field(default=0, ge=0)
    batch_id: str | None = None
    batch_index: int | None = None
    seed: int | None = None
    instance: str | None = None
    prompt_id: str | None = None
    output_image_url: str | None = None
    output_image_urls: list[str] | None = None
    error: TaskError | None = None
    timings_ms: dict[str, int] = Field(default_factory=dict)
    metadata: dict[str, Any] | None = None
    created_at: datetime = Field(default_factory=utcnow)
    updated_at: datetime = Field(default_factory=utcnow)
    terminal_event: str | None = None  # the terminal event's JSON as published, to re-publish

    @property
    def key(self) -> str:
        """The store key of this record: `task_key(user_id, task_id)`."""
        return task_key(self.user_id, self.task_id)


class TaskCounts(TypedDict):
    """Live records by status (every status, zeros included) and by style (non-zero only)."""

    by_status: dict[str, int]
    by_style: dict[str, int]


class TaskStateStore(Protocol):
    """Task records and run leases. Every method is atomic on its own.

    A `key` is `task_key(user_id, task_id)`; `record.key` gives a record's own.
    """

    async def create(self, record: TaskRecord) -> bool:
        """Store a new record under `record.key`; False (nothing written) when that key exists."""

    async def get(self, key: str) -> TaskRecord | None: ...

    async def update(self, key: str, **changes: Any) -> TaskRecord | None:
        """The record after `changes` (see the module rules); None if missing or refused."""

    async def find(self, task_id: str, limit: int = 10) -> list[TaskRecord]:
        """The live records of any user with this bare task id: oldest first, at most `limit`."""

    async def list_for_user(self, user_id: str, limit: int) -> list[TaskRecord]:
        """The user's newest `limit` records, newest first."""

    async def counts(self) -> TaskCounts: ...

    async def acquire_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """Take the task's lease when free or expired (or already `owner`'s: then extend it)."""

    async def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        """Extend the lease only while `owner` holds it."""

    async def release_lease(self, key: str, owner: str) -> None:
        """Drop the lease if `owner` holds it; another owner's lease is left alone."""

    async def lease_owner(self, key: str) -> str | None: ...

    async def add_cancel(self, user_id: str, task_id: str) -> None:
        """Remember that `user_id` cancelled `task_id` before it was seen (creates no record)."""

    async def cancel_requested(self, user_id: str, task_id: str) -> bool:
        """Whether `user_id` (only that user) cancelled `task_id` and the cancel is unexpired."""

    async def end_batch_task(
        self, batch_id: str, task_id: str, size: int, claim_ttl_s: float
    ) -> bool:
        """Note that `task_id` of the `size`-task batch ended (again is a no-op); True only
        when every task has ended and this call claims the announcement for `claim_ttl_s`."""

    async def confirm_batch_announced(self, batch_id: str) -> None:
        """The announcement went out: hold the claim for `ttl_s`, so none follows."""

    async def ping(self) -> bool: ...

    async def close(self) -> None: ...


def apply_changes(
    current: TaskRecord, changes: Mapping[str, Any], now: datetime
) -> TaskRecord | None:
    """`current` after `changes`: `current` itself for a terminal no-op, None when refused."""
    if fixed := IMMUTABLE_FIELDS & changes.keys():
        raise ValueError(f"task {current.task_id!r}: {', '.join(sorted(fixed))} cannot change")
    candidate = TaskRecord.model_validate({**current.model_dump(), **changes, "updated_at": now})
    if current.status.is_terminal:
        return current if _same(current, candidate, changes) else None
    if candidate.attempt < current.attempt:
        return None
    if candidate.attempt > current.attempt:
        progress = candidate.progress if "progress" in changes else 0
    else:
        progress = max(candidate.progress, current.progress)
    return candidate.model_copy(update={"progress": progress})


def _same(current: TaskRecord, candidate: TaskRecord, changes: Mapping[str, Any]) -> bool:
    names = changes.keys() - {"updated_at"}
    return all(getattr(candidate, name) == getattr(current, name) for name in names)


# The stores import the names above, so they are re-exported last.
from consumer.state.memory import MemoryTaskStore  # noqa: E402
from consumer.state.redis import RedisTaskStore  # noqa: E402
