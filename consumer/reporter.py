"""Turns job milestones into state-store updates and published events.

Progress events are lossy by nature: throttled to one per `progress_interval_s` per task,
only when the percentage changes, and dropped (logged) when the broker cannot take them.
`accepted` and terminal events are never dropped: they are retried until the broker confirms
them, or until shutdown cancels the wait (the message then stays unacked and is redelivered).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from consumer.errors import BrokerUnavailable, TransientError
from consumer.events import until_confirmed
from consumer.logs import ctx
from consumer.state import task_key
from contracts import EventKind, TaskStatus
from contracts.models import BatchCompletedEvent

if TYPE_CHECKING:
    from consumer.events import EventPublisher
    from consumer.jobs import Job, Reply
    from consumer.metrics import Metrics
    from consumer.state import TaskStateStore
    from contracts.models import TaskEvent

log = logging.getLogger(__name__)


class Reporter:
    """The one place that tells the outside world where a job stands."""

    def __init__(
        self,
        publisher: EventPublisher,
        store: TaskStateStore,
        metrics: Metrics,
        progress_interval_s: float,
    ) -> None:
        self._publisher = publisher
        self._store = store
        self._metrics = metrics
        self._interval_s = progress_interval_s
        self._last_progress_at: dict[str, float] = {}

    async def accepted(self, job: Job) -> None:
        event = job.event(EventKind.ACCEPTED)
        await until_confirmed(lambda: self.publish(event))

    async def started(self, job: Job) -> None:
        await self._store.update(
            job.key,
            status=TaskStatus.PROCESSING,
            instance=job.instance,
            prompt_id=job.prompt_id,
            attempt=job.attempt,
            style_version=job.style.version,  # a redelivery runs with the catalog in use now
        )
        event = job.event(EventKind.STARTED)
        await until_confirmed(lambda: self.publish(event))

    async def progress(self, job: Job, percent: int) -> None:
        now = time.monotonic()
        last_at = self._last_progress_at.get(job.key)
        if percent <= job.progress or (last_at is not None and now - last_at < self._interval_s):
            return
        job.progress = percent
        self._last_progress_at[job.key] = now
        await self._store.update(job.key, progress=percent)
        try:
            await self.publish(job.event(EventKind.PROGRESS))
        except BrokerUnavailable as exc:
            log.info("progress event dropped", extra=ctx(task_id=job.task_id, error=str(exc)))

    async def retrying(self, job: Job, error: TransientError, delay_s: float) -> None:
        """Announce attempt `job.attempt` (already counted) after `error` ended the last one."""
        job.progress = 0
        await self._store.update(job.key, attempt=job.attempt, progress=0)
        event = job.error_event(EventKind.RETRYING, error.code, error.message, retriable=True)
        await until_confirmed(lambda: self.publish(event))
        log.info("retry in %.1fs", delay_s, extra=ctx(task_id=job.task_id))

    async def publish(self, event: TaskEvent | BatchCompletedEvent) -> None:
        await self._publisher.publish_event(event)
        self._metrics.events_published.labels(event.event).inc()
        level = logging.DEBUG if event.event == EventKind.PROGRESS else logging.INFO
        log.log(level, "event %s", event.event, extra=ctx(**_log_fields(event)))

    async def terminal(self, event: TaskEvent, reply: Reply | None) -> None:
        """Publish a terminal event (and its RPC reply), retrying until confirmed."""
        self._last_progress_at.pop(task_key(event.user_id, event.task_id), None)
        await until_confirmed(lambda: self.publish(event))
        if reply is not None:
            await until_confirmed(
                lambda: self._publisher.publish_reply(reply.reply_to, reply.correlation_id, event)
            )


def _log_fields(event: TaskEvent | BatchCompletedEvent) -> dict[str, object]:
    fields: dict[str, object] = {"user_id": event.user_id, "style_type": event.style_type}
    if isinstance(event, BatchCompletedEvent):
        return {**fields, "batch_id": event.batch_id}
    error = event.error.code if event.error else None
    return {
        **fields,
        "task_id": event.task_id,
        "instance": event.instance,
        "progress": event.progress,
        "error": error,
    }
