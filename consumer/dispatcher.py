"""Owns every running task of this replica, keyed by task_id, and decides how each ends.

A task runs in an asyncio task of ours, never in the consumer callback (aio-pika cancels
callbacks when a channel drops, which would kill a GPU job on every network blip). The
delivery is only a handle: a redelivered copy attaches to the running task, and every
handle is settled when the task ends, after its terminal event is confirmed.

How a task ends, and what happens to its message (the single ack decision, `_finish`):
    completed / failed / cancelled   store terminal state -> publish (confirmed) -> ack
    shutdown or lost channel         nothing: the message stays unacked and is redelivered
    unexpected exception (a bug)     reject(requeue) so the queue's delivery limit stops
                                     a message that crashes every time; on the last allowed
                                     delivery a `failed` event (internal_error) goes out first
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consumer import records
from consumer.broker import delivery_count
from consumer.errors import ConsumerError, InvalidRequest
from consumer.jobs import Job, utcnow
from consumer.logs import ctx
from consumer.state import TaskRecord
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.models import TaskEvent

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage

    from consumer.jobs import BatchRef
    from consumer.leases import Leases
    from consumer.metrics import Metrics
    from consumer.pipeline import Pipeline
    from consumer.reporter import Reporter
    from consumer.state import TaskStateStore
    from consumer.workflows import Style, StyleCatalog
    from contracts.models import BatchTransformRequest, CancelRequest, TransformRequest

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1
INTERRUPT_TIMEOUT_S = 30.0  # for interrupting prompts and finishing terminal writes
STORE_RETRY_S = 1.0


class Dispatcher:
    """Starts, tracks, cancels and finishes tasks."""

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        reporter: Reporter,
        store: TaskStateStore,
        catalog: StyleCatalog,
        metrics: Metrics,
        delivery_limit: int,
        leases: Leases,
    ) -> None:
        self._leases = leases
        self._pipeline = pipeline
        self._reporter = reporter
        self._store = store
        self._catalog = catalog
        self._metrics = metrics
        self._delivery_limit = delivery_limit
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._admitting: dict[str, _Admission] = {}
        self._finishing: set[asyncio.Task[None]] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ended = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Dispatcher running={len(self._running)} finishing={len(self._finishing)}>"

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def ended_event(self) -> asyncio.Event:
        """Set when the next task ends (take it before checking)."""
        return self._ended

    def held_outside(self, consumer_tag: str | None) -> int:
        """Tasks in hand that were delivered to another consumer than `consumer_tag`."""
        return sum(
            1 for job, _ in self._running.values() if job.handles[0].consumer_tag != consumer_tag
        )

    async def submit(
        self,
        message: AbstractIncomingMessage,
        request: TransformRequest,
        batch: BatchRef | None = None,
    ) -> None:
        """Start (or attach to, or answer from the store) the task this delivery asks for."""
        task_id = request.task_id or message.message_id or uuid.uuid4().hex
        if (handles := self._handles_of(task_id)) is not None:
            handles.append(message)  # a copy of a task this replica has in hand
            return
        style = self._catalog.get(request.style_type)
        admission = self._admitting[task_id] = _Admission(request.user_id, [message])
        try:
            await self._admit(task_id, request, style, batch, admission.handles)
        except BaseException:
            await _settle(admission.handles[1:], requeue=True)  # copies that attached meanwhile
            raise
        finally:
            del self._admitting[task_id]

    def _handles_of(self, task_id: str) -> list[AbstractIncomingMessage] | None:
        if (running := self._running.get(task_id)) is not None:
            return running[0].handles
        admission = self._admitting.get(task_id)
        return admission.handles if admission else None

    async def _admit(
        self,
        task_id: str,
        request: TransformRequest,
        style: Style,
        batch: BatchRef | None,
        handles: list[AbstractIncomingMessage],
    ) -> None:
        message = handles[0]
        record = await self._store.get(task_id)
        if record is not None and record.user_id != request.user_id:
            raise InvalidRequest(f"task_id {task_id!r} is already used by another user")
        job = Job(
            task_id=task_id,
            request=request,
            style=style,
            seed=_seed(request, record),
            batch=batch,
            reply_to=message.reply_to,
            correlation_id=message.correlation_id,
            created_at=record.created_at if record else utcnow(),
            handles=handles,
        )
        if record is not None and record.status.is_terminal:
            await self._answer_from_store(job, record)
            return
        await self._accept(job, record)

    async def _accept(self, job: Job, record: TaskRecord | None) -> None:
        if record is None:
            await self._store.create(records.new_record(job))
        await self._reporter.accepted(job)
        self._start(job)

    def _start(self, job: Job) -> None:
        admission = self._admitting.get(job.task_id)
        job.cancel_requested = admission is not None and admission.cancelled
        task = asyncio.create_task(self._run(job), name=f"task-{job.task_id}")
        self._running[job.task_id] = (job, task)
        self._idle.clear()
        self._metrics.tasks_in_flight.set(len(self._running))

    async def _answer_from_store(self, job: Job, record: TaskRecord) -> None:
        """A redelivery of an ended task: publish its terminal event again, then ack."""
        if record.terminal_event is not None:  # the same event, event_id included
            event = TaskEvent.model_validate_json(record.terminal_event)
        else:  # cancelled while it waited in the queue
            event = _cancelled(job)
        await self._guarded_finish(job, event)

    async def _run(self, job: Job) -> None:
        try:
            await self._run_leased(job)
        except asyncio.CancelledError:
            if not job.cancel_requested:
                raise
            _uncancel()  # cancelled by its owner before the pipeline ran
            await asyncio.shield(self._guarded_finish(job, _cancelled(job)))
        except Exception:  # bookkeeping failed (store down?): requeue; the delivery limit applies
            log.exception("task bookkeeping failed; requeued", extra=ctx(task_id=job.task_id))
            await self._crashed(job)
        finally:
            if self._running.get(job.task_id, (None,))[0] is job:
                del self._running[job.task_id]
            self._ended.set()
            self._ended = asyncio.Event()
            if job.acked:  # copies that attached while it finished: the answer stands
                await _settle(job.handles[job.acked :], requeue=False)
            self._metrics.tasks_in_flight.set(len(self._running))
            if not self._running:
                self._idle.set()

    async def _run_leased(self, job: Job) -> None:
        ended = await self._leases.acquire(job.task_id)
        if ended is not None:  # another replica finished it while we waited
            await self._answer_from_store(job, ended)
            return
        async with self._leases.held(job.task_id):
            record = await self._store.get(job.task_id)
            if record is not None and record.status.is_terminal:  # e.g. cancelled meanwhile
                await self._answer_from_store(job, record)
                return
            if job.cancel_requested:
                await self._guarded_finish(job, _cancelled(job))
                return
            _recall_previous_prompt(job, record)
            event = await self._outcome(job)
            if event is not None:
                await asyncio.shield(self._guarded_finish(job, event))

    async def _outcome(self, job: Job) -> TaskEvent | None:
        """Run the pipeline; the terminal event, or None when the message must be requeued."""
        try:
            result = await self._pipeline.run(job)
        except asyncio.CancelledError:
            if not job.cancel_requested:
                raise
            _uncancel()
            return _cancelled(job)
        except ConsumerError as exc:
            return job.error_event(EventKind.FAILED, exc.code, exc.message, retriable=exc.retriable)
        except Exception:
            log.exception("task crashed", extra=ctx(task_id=job.task_id, user_id=job.user_id))
            await self._crashed(job)
            return None
        return job.event(
            EventKind.COMPLETED, output_image_url=result.urls[0], output_image_urls=result.urls
        )

    async def _crashed(self, job: Job) -> None:
        """A bug or a broken store: requeue, counted by the queue's delivery limit.

        On the last allowed delivery the owner is told first (`failed`, internal_error);
        the queue then dead-letters the message. Telling is best effort: whatever failed
        may fail again.
        """
        if await self.waited_for_store():
            await _settle(job.handles, requeue=True)  # an outage, not this task's fault
            return
        try:
            if delivery_count(job.handles[-1]) >= self._delivery_limit:
                event = job.error_event(
                    EventKind.FAILED,
                    ErrorCode.INTERNAL_ERROR,
                    "processing crashed on every delivery",
                    retriable=False,
                )
                await self._store_terminal(job, event)
                await self._reporter.terminal(event, job.reply_to, job.correlation_id)
        except Exception:
            log.exception("could not record the crash of %s", job.task_id)
        await _settle(job.handles, requeue=True)

    async def waited_for_store(self) -> bool:
        """If the task store is down, wait until it answers again; True if it was down.

        A store outage must not burn every prefetched message's delivery limit in a moment.
        """
        if await self._store.ping():
            return False
        log.warning("task store unreachable; holding deliveries until it answers")
        while not await self._store.ping():  # noqa: ASYNC110 - polling a remote store
            await asyncio.sleep(STORE_RETRY_S)  # an outage has no push
        log.info("task store reachable again")
        return True

    async def _guarded_finish(self, job: Job, event: TaskEvent) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._finishing.add(task)
        try:
            await self._finish(job, event)
        finally:
            if task is not None:
                self._finishing.discard(task)

    async def _finish(self, job: Job, event: TaskEvent) -> None:
        """Store the terminal state, publish it (confirmed), then ack every handle."""
        event = await self._store_terminal(job, event)
        await self._reporter.terminal(event, job.reply_to, job.correlation_id)
        self._metrics.tasks.labels(job.style.name, event.status.value).inc()
        log.info(
            "task %s",
            event.status.value,
            extra=ctx(
                **job.log_fields(),
                error=event.error.code if event.error else None,
                timings_ms=job.timings_ms or None,
            ),
        )
        if job.batch is not None:
            await self._maybe_batch_done(job)
        await _settle(job.handles, requeue=False)
        job.acked = len(job.handles)

    async def _store_terminal(self, job: Job, event: TaskEvent) -> TaskEvent:
        """Record the terminal state; when another ending won the race, publish that one."""
        changes = {
            "status": event.status,
            "terminal_event": event.model_dump_json(),
            "output_image_url": event.output_image_url,
            "output_image_urls": event.output_image_urls,
            "error": event.error.model_dump(mode="json") if event.error else None,
        }
        extras = {
            "progress": event.progress,
            "instance": job.instance,
            "timings_ms": job.timings_ms,
        }
        if await self._store.update(job.task_id, **changes, **extras) is not None:
            return event
        stored = await self._store.get(job.task_id)
        if stored is not None and stored.terminal_event is not None:
            return TaskEvent.model_validate_json(stored.terminal_event)  # another ending won
        if stored is not None and stored.status is TaskStatus.CANCELLED:
            return _cancelled(job)  # its owner cancelled it while it was pending
        refused_detail = stored is not None and not stored.status.is_terminal
        # Refused for a detail (e.g. a stale progress figure): the ending still counts.
        if refused_detail and await self._store.update(job.task_id, **changes) is None:
            log.error("the store refused the end of %s", job.task_id)
        return event

    async def _maybe_batch_done(self, job: Job) -> None:
        if job.batch is not None:
            event = await records.batch_completion(self._store, job, job.batch)
            if event is not None:
                await self._reporter.publish(event)

    async def record_rejection(self, event: TaskEvent) -> None:
        await records.record_rejection(self._store, event)

    async def register_batch(self, batch_id: str, batch: BatchTransformRequest) -> None:
        await records.register_batch(self._store, batch_id, batch)

    async def cancel(self, request: CancelRequest) -> int:
        """Cancel the owner's task or batch wherever it is; returns how many were found."""
        found = 0
        for job, task in list(self._running.values()):
            if job.user_id == request.user_id and _matches(job, request):
                job.cancel_requested = True
                task.cancel()
                found += 1
        for task_id in await self._cancel_targets(request):
            if task_id in self._running:
                continue
            if (admission := self._admitting.get(task_id)) is not None:
                if admission.user_id == request.user_id:
                    admission.cancelled = True
                    found += 1
                continue
            found += await records.tombstone(self._store, task_id, request.user_id)
        return found

    async def _cancel_targets(self, request: CancelRequest) -> list[str]:
        if request.task_id is not None:
            return [request.task_id]
        return await records.batch_task_ids(self._store, request.batch_id or "")

    async def drain(self, grace_s: float) -> None:
        """Let running tasks finish for up to `grace_s`, then interrupt the rest (unacked)."""
        try:
            async with asyncio.timeout(grace_s):
                await self._idle.wait()
        except TimeoutError:
            log.warning("grace period over, interrupting %d task(s)", len(self._running))
        try:
            async with asyncio.timeout(INTERRUPT_TIMEOUT_S):
                await self._interrupt_all()
        except TimeoutError:
            log.warning("%d task(s) did not stop in time", len(self._running))

    async def _interrupt_all(self) -> None:
        """Cancel every task (each interrupts its prompt), including any started meanwhile."""
        while self._running or self._finishing:
            tasks = {task for _, task in self._running.values()} | self._finishing
            for _, task in self._running.values():
                task.cancel()
            await asyncio.wait(tasks)


@dataclass
class _Admission:
    """A delivery being admitted: copies that arrive meanwhile attach to it."""

    user_id: str
    handles: list[AbstractIncomingMessage]
    cancelled: bool = False


def _cancelled(job: Job) -> TaskEvent:
    return job.error_event(
        EventKind.CANCELLED, ErrorCode.CANCELLED, "cancelled by its owner", retriable=False
    )


def _recall_previous_prompt(job: Job, record: TaskRecord | None) -> None:
    """A task run before (by a replica that died) may have left a prompt to adopt."""
    if record is not None and record.prompt_id and record.instance:
        job.previous_prompt = (record.instance, record.prompt_id)


def _matches(job: Job, request: CancelRequest) -> bool:
    if request.task_id is not None:
        return job.task_id == request.task_id
    return job.batch is not None and job.batch.batch_id == request.batch_id


def _seed(request: TransformRequest, record: TaskRecord | None) -> int:
    if request.seed is not None:
        return request.seed
    if record is not None and record.seed is not None:
        return record.seed
    return random.randint(0, MAX_SEED)


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


async def _settle(handles: list[AbstractIncomingMessage], *, requeue: bool) -> None:
    """Ack (or reject for requeue) every live handle; a dead channel's handle is moot."""
    for message in handles:
        try:
            if requeue:
                await message.reject(requeue=True)
            else:
                await message.ack()
        except Exception as exc:  # the channel is gone: the broker redelivers; idempotent
            log.debug("could not settle a delivery: %s", exc)
