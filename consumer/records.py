"""How requests and their endings are written to the task store: new, terminal, refused,
cancelled-before-seen, batches. Pure store logic, no broker and no running tasks.
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING, Any

from consumer.jobs import utcnow
from consumer.state import TaskRecord, task_key
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.ids import MAX_BATCH_SIZE, batch_task_id
from contracts.models import BatchCompletedEvent, TaskError, TaskEvent

if TYPE_CHECKING:
    from collections.abc import Mapping

    from consumer.jobs import BatchRef, Job
    from consumer.state import TaskStateStore
    from contracts.models import BatchTransformRequest, TransformRequest

log = logging.getLogger(__name__)
CANCELLED_BY_OWNER = "cancelled by its owner"


def new_record(job: Job) -> TaskRecord:
    """The pending record of a task seen for the first time."""
    return TaskRecord(
        task_id=job.task_id,
        user_id=job.user_id,
        style_type=job.style.name,
        style_version=job.style.version,
        status=TaskStatus.PENDING,
        seed=job.seed,
        batch_id=job.batch.batch_id if job.batch else None,
        batch_index=job.batch.index if job.batch else None,
        metadata=job.request.metadata,
        created_at=job.created_at,
        updated_at=utcnow(),
    )


async def record_rejection(store: TaskStateStore, event: TaskEvent) -> None:
    """Keep a refused request's `failed` event, so a lookup agrees with what was published."""
    now = utcnow()
    record = TaskRecord(
        task_id=event.task_id,
        user_id=event.user_id,
        style_type=event.style_type or "",
        style_version=event.style_version,
        status=event.status,
        error=event.error,
        terminal_event=event.model_dump_json(),
        created_at=now,
        updated_at=now,
    )
    await store.create(record)  # False: the id is taken; its own record stays


async def register_batch(
    store: TaskStateStore, batch_id: str, batch: BatchTransformRequest
) -> None:
    """Record a batch's tasks as pending when it is expanded, so a cancel can find them."""
    now = utcnow()
    for index in range(len(batch.image_urls)):
        record = TaskRecord(
            task_id=batch_task_id(batch_id, index),
            user_id=batch.user_id,
            style_type=batch.style_type,
            status=TaskStatus.PENDING,
            batch_id=batch_id,
            batch_index=index,
            metadata=batch.metadata,
            created_at=now,
            updated_at=now,
        )
        await store.create(record)  # False on a re-expansion: it is there already


async def batch_owned(store: TaskStateStore, ref: BatchRef, request: TransformRequest) -> bool:
    """Whether `ref` names the batch task this request is, of a batch its sender owns."""
    if request.task_id != batch_task_id(ref.batch_id, ref.index):
        return False
    return await _batch_task_recorded(store, request.user_id, ref.batch_id, ref.index)


async def batch_registered(store: TaskStateStore, user_id: str, batch_id: str) -> bool:
    """Whether `user_id` owns a batch `batch_id` that was registered (its first task exists)."""
    return await _batch_task_recorded(store, user_id, batch_id, 0)


async def _batch_task_recorded(
    store: TaskStateStore, user_id: str, batch_id: str, index: int
) -> bool:
    record = await store.get(task_key(user_id, batch_task_id(batch_id, index)))
    return record is not None and record.batch_id == batch_id


async def batch_task_ids(store: TaskStateStore, user_id: str, batch_id: str) -> list[str]:
    """The recorded tasks of `user_id`'s batch, in order."""
    ids = []
    for index in range(MAX_BATCH_SIZE):
        task_id = batch_task_id(batch_id, index)
        if await store.get(task_key(user_id, task_id)) is None:
            break
        ids.append(task_id)
    return ids


async def tombstone(store: TaskStateStore, user_id: str, task_id: str) -> bool:
    """Cancel a task of `user_id` that waits in the queue, or that was not seen yet.

    An unseen id creates no task record: the cancel is remembered, and the task is cancelled
    when its request arrives. A task being processed is cancelled by the replica running it,
    which gets the same cancel.
    """
    key = task_key(user_id, task_id)
    record = await store.get(key)
    if record is None:
        await store.add_cancel(user_id, task_id)
        return True
    if record.status is not TaskStatus.PENDING:
        return False
    return await store.update(key, status=TaskStatus.CANCELLED) is not None


async def store_terminal(
    store: TaskStateStore, event: TaskEvent, details: Mapping[str, Any]
) -> TaskEvent:
    """Record a task's terminal state; when another ending won the race, that one's event.

    `details` (progress, instance, timings) are stored alongside when the store takes them.
    """
    changes = {
        "status": event.status,
        "style_version": event.style_version,  # the version that ran (a redelivery: the last)
        "terminal_event": event.model_dump_json(),
        "output_image_url": event.output_image_url,
        "output_image_urls": event.output_image_urls,
        "error": event.error.model_dump(mode="json") if event.error else None,
    }
    key = task_key(event.user_id, event.task_id)
    if await store.update(key, **changes, **details) is not None:
        return event
    stored = await store.get(key)
    if stored is not None and stored.terminal_event is not None:
        return TaskEvent.model_validate_json(stored.terminal_event)  # another ending won
    if stored is not None and stored.status is TaskStatus.CANCELLED:
        return cancelled_event(event)  # its owner cancelled it while it was pending
    # Refused for a detail (e.g. a stale progress figure): the ending still counts.
    if stored is not None and await store.update(key, **changes) is None:
        log.error("the store refused the end of %s", event.task_id)
    return event


def cancelled_event(event: TaskEvent) -> TaskEvent:
    """`event` turned into the task's `cancelled` event."""
    error = TaskError(code=ErrorCode.CANCELLED, message=CANCELLED_BY_OWNER, retriable=False)
    return event.model_copy(
        update={
            "event": EventKind.CANCELLED,
            "status": TaskStatus.CANCELLED,
            "error": error,
            "output_image_url": None,
            "output_image_urls": None,
        }
    )


async def batch_completion(
    store: TaskStateStore, event: TaskEvent, batch: BatchRef
) -> BatchCompletedEvent:
    """The batch's `batch.completed` event, from the records of its tasks."""
    task_ids = [batch_task_id(batch.batch_id, i) for i in range(batch.size)]
    keys = [task_key(event.user_id, task_id) for task_id in task_ids]
    statuses = [record.status for record in await _records(store, keys) if record]
    return BatchCompletedEvent(
        # Announced once; re-announced (same id) only when a replica died while announcing.
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"batch.completed/{batch.batch_id}").hex,
        batch_id=batch.batch_id,
        user_id=event.user_id,
        style_type=event.style_type,
        task_ids=task_ids,
        completed=statuses.count(TaskStatus.COMPLETED),
        failed=statuses.count(TaskStatus.FAILED),
        cancelled=statuses.count(TaskStatus.CANCELLED),
        metadata=event.metadata,
        timestamp=utcnow(),
    )


async def _records(store: TaskStateStore, keys: list[str]) -> list[TaskRecord | None]:
    return [await store.get(key) for key in keys]
