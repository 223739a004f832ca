"""The task records the dispatcher writes besides a running task's own: batches, tombstones,
refusals. Pure store logic, no broker and no running tasks.
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from consumer.jobs import utcnow
from consumer.state import TaskRecord
from contracts import TaskStatus
from contracts.ids import MAX_BATCH_SIZE, batch_task_id
from contracts.models import BatchCompletedEvent

if TYPE_CHECKING:
    from consumer.jobs import BatchRef, Job
    from consumer.state import TaskStateStore
    from contracts.models import BatchTransformRequest, TaskEvent


def new_record(job: Job) -> TaskRecord:
    """The pending record of a task seen for the first time."""
    return TaskRecord(
        task_id=job.task_id,
        user_id=job.user_id,
        style_type=job.style.name,
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


async def batch_task_ids(store: TaskStateStore, batch_id: str) -> list[str]:
    """The recorded tasks of a batch, in order."""
    ids = []
    for index in range(MAX_BATCH_SIZE):
        task_id = batch_task_id(batch_id, index)
        if await store.get(task_id) is None:
            break
        ids.append(task_id)
    return ids


async def tombstone(store: TaskStateStore, task_id: str, user_id: str) -> bool:
    """Mark a task that waits in the queue (or is not yet seen) as cancelled.

    Only a pending task: one being processed is cancelled by the replica running it, which
    gets the same cancel.
    """
    record = await store.get(task_id)
    if record is None:
        now = utcnow()
        cancelled = TaskRecord(
            task_id=task_id,
            user_id=user_id,
            style_type="",
            status=TaskStatus.CANCELLED,
            created_at=now,
            updated_at=now,
        )
        return await store.create(cancelled)
    if record.user_id != user_id or record.status is not TaskStatus.PENDING:
        return False
    return await store.update(task_id, status=TaskStatus.CANCELLED) is not None


async def batch_completion(
    store: TaskStateStore, job: Job, batch: BatchRef
) -> BatchCompletedEvent | None:
    """The batch's `batch.completed` event once every task of it has ended, else None."""
    task_ids = [batch_task_id(batch.batch_id, i) for i in range(batch.size)]
    records = [await store.get(task_id) for task_id in task_ids]
    if not all(r is not None and r.status.is_terminal for r in records):
        return None
    statuses = [r.status for r in records if r is not None]
    return BatchCompletedEvent(
        # Every replica that sees the batch end announces it: one id to dedupe on.
        event_id=uuid.uuid5(uuid.NAMESPACE_URL, f"batch.completed/{batch.batch_id}").hex,
        batch_id=batch.batch_id,
        user_id=job.user_id,
        style_type=job.style.name,
        task_ids=task_ids,
        completed=statuses.count(TaskStatus.COMPLETED),
        failed=statuses.count(TaskStatus.FAILED),
        cancelled=statuses.count(TaskStatus.CANCELLED),
        metadata=job.request.metadata,
        timestamp=utcnow(),
    )
