"""Owns every running task of this replica, keyed by task_id, and decides how each ends.

A task runs in an asyncio task of the dispatcher's TaskGroup, never in the consumer callback
(aio-pika cancels callbacks when a channel drops, which would kill a GPU job on every network
blip). The group lives inside the service's own, so a failing loop cannot close the broker,
pool or store under running tasks. The delivery is only a handle: a redelivered copy attaches
to the running task, and every handle is settled when the task ends.

The dispatcher only decides the outcome (`consumer.settle` performs it, in one place):
    completed / failed / cancelled   Finished: terminal record, event, reply, then ack
    an ended task delivered again    Finished with the stored terminal event
    shutdown, or the task store down Returned: nack, not counted on RabbitMQ 4.3
    unexpected exception (a bug)     Crashed: reject(requeue), counted by the delivery limit;
                                     on the last allowed delivery a `failed` event goes first
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING

from consumer import records, tracing
from consumer.broker import delivery_count
from consumer.comfy.scheduling import Priority
from consumer.errors import ConsumerError
from consumer.jobs import Job, utcnow
from consumer.logs import ctx
from consumer.settle import Action, Crashed, Finished, Outcome, Returned, apply
from consumer.state import task_key
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.ids import is_valid_id
from contracts.models import TaskEvent

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage
    from opentelemetry.trace import Tracer

    from consumer.comfy import PromptRun
    from consumer.jobs import BatchRef, Reply
    from consumer.leases import Leases
    from consumer.metrics import Metrics
    from consumer.pipeline import Pipeline
    from consumer.reporter import Reporter
    from consumer.settle import Settler
    from consumer.state import TaskRecord, TaskStateStore
    from consumer.workflows import Style, StyleLookup
    from contracts.models import CancelRequest, TransformRequest

log = logging.getLogger(__name__)
MAX_SEED = 2**32 - 1
INTERRUPT_TIMEOUT_S = 30.0  # for interrupting prompts and finishing terminal writes
STORE_RETRY_S = 1.0


class Dispatcher:
    """Starts, tracks, cancels and ends tasks.

    `prompts_adoptable`: the task store is shared (Redis), so a prompt this replica leaves on
    an instance is adopted by the replica that gets the task next (see `drain`).
    """

    def __init__(
        self,
        *,
        pipeline: Pipeline,
        reporter: Reporter,
        settler: Settler,
        store: TaskStateStore,
        catalog: StyleLookup,
        metrics: Metrics,
        delivery_limit: int,
        leases: Leases,
        prompts_adoptable: bool = False,
        tracer: Tracer = tracing.NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._leases = leases
        self._prompts_adoptable = prompts_adoptable
        self._pipeline = pipeline
        self._reporter = reporter
        self._settler = settler
        self._store = store
        self._catalog = catalog
        self._metrics = metrics
        self._delivery_limit = delivery_limit
        self._running: dict[str, tuple[Job, asyncio.Task[None]]] = {}
        self._admitting: dict[str, _Admission] = {}
        self._group: asyncio.TaskGroup | None = None
        self._opened = asyncio.Event()
        self._closing = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._ended = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Dispatcher running={len(self._running)} admitting={len(self._admitting)}>"

    @property
    def in_flight(self) -> int:
        return len(self._running)

    @property
    def ended_event(self) -> asyncio.Event:
        """Set when the next task ends (take it before checking)."""
        return self._ended

    def held_outside(self, consumer_tag: str | None) -> int:
        """Tasks in hand that were delivered to another consumer than `consumer_tag` (not
        counting those taken with basic.get, which no consumer's window counts)."""
        return sum(
            1
            for job, _ in self._running.values()
            if job.handles[0].consumer_tag not in {consumer_tag, None}
        )

    async def run(self) -> None:
        """Own the tasks' asyncio tasks until `close()`; cancelled, it cancels them (each gives
        its delivery back) and returns once they have ended."""
        async with asyncio.TaskGroup() as group:
            self._group = group
            self._opened.set()
            await self._closing.wait()
        self._group = None

    def close(self) -> None:
        """Take no more tasks; `run()` returns once the running ones have ended."""
        self._closing.set()

    async def submit(
        self,
        message: AbstractIncomingMessage,
        request: TransformRequest,
        batch: BatchRef | None = None,
        reply: Reply | None = None,
        priority: Priority = Priority.INTERACTIVE,
    ) -> Outcome | None:
        """Start (or attach to) the task this delivery asks for; None once a task owns it.

        Raises a ConsumerError when the request must be refused.
        """
        await self._opened.wait()
        task_id = _task_id(request, message)
        key = task_key(request.user_id, task_id)
        if (handles := self._handles_of(key)) is not None:
            handles.append(message)  # a copy of a task this replica has in hand
            return None
        if self._closing.is_set():
            return Returned("shutting down")
        style = self._catalog.get(request.style_type)  # unknown: refused before anything
        admission = self._admitting[key] = _Admission([message], style, priority)
        try:
            job = await self._admit(task_id, request, batch, reply, admission)
            if self._closing.is_set():  # shut down while it was admitted
                return Returned("shutting down")
        except BaseException:
            await self._settler.settle(admission.handles[1:], Returned("its first copy failed"))
            raise
        finally:
            del self._admitting[key]
        self._start(job)
        return None

    def _handles_of(self, key: str) -> list[AbstractIncomingMessage] | None:
        if (running := self._running.get(key)) is not None:
            return running[0].handles
        admission = self._admitting.get(key)
        return admission.handles if admission else None

    async def _admit(
        self,
        task_id: str,
        request: TransformRequest,
        batch: BatchRef | None,
        reply: Reply | None,
        admission: _Admission,
    ) -> Job:
        record = await self._store.get(task_key(request.user_id, task_id))
        job = Job(
            task_id=task_id,
            request=request,
            style=admission.style,  # kept whatever reloads follow
            seed=_seed(request, record),
            batch=batch,
            reply=reply,
            created_at=record.created_at if record else utcnow(),
            handles=admission.handles,
            priority=admission.priority,
        )
        if record is None or not record.status.is_terminal:  # else: answered from the store
            await self._accept(job, record)
        job.cancel_requested = job.cancel_requested or admission.cancelled
        return job

    async def _accept(self, job: Job, record: TaskRecord | None) -> None:
        if record is None:
            await self._store.create(records.new_record(job))
            job.cancel_requested = await self._store.cancel_requested(job.user_id, job.task_id)
        if not job.cancel_requested:
            await self._reporter.accepted(job)

    def _start(self, job: Job) -> None:
        if self._group is None:
            raise RuntimeError("the dispatcher is not running")
        task = self._group.create_task(self._run(job), name=f"task-{job.key}")
        self._running[job.key] = (job, task)
        self._idle.clear()
        self._metrics.tasks_in_flight.set(len(self._running))

    async def _run(self, job: Job) -> None:
        with tracing.task_span(self._tracer, job):  # a child of its delivery's span
            await self._run_traced(job)

    async def _run_traced(self, job: Job) -> None:
        try:
            await self._run_decided(job)
        except Exception:  # deciding the crash failed too: the last resort cannot fail to settle
            log.exception("task ending failed", extra=ctx(task_id=job.task_id))
            await self._settler.settle(list(job.handles), Crashed("its ending failed"))
        finally:
            await self._forget(job)

    async def _run_decided(self, job: Job) -> None:
        try:
            await self._run_leased(job)
        except asyncio.CancelledError:
            if job.settling:  # the ending goes on without us
                raise
            if not job.cancel_requested:  # shutdown: give the delivery back before the channel goes
                await self._settle(job, Returned("shutting down"))
                raise
            _uncancel()  # cancelled by its owner before the pipeline ran
            await self._settle(job, self._finished(job, _cancelled(job)))
        except Exception:  # bookkeeping failed (the store?): decided like a crash
            log.exception("task bookkeeping failed", extra=ctx(task_id=job.task_id))
            await self._settle(job, await self._crash_outcome(job))

    async def _run_leased(self, job: Job) -> None:
        """Run the task under its lease; the lease is held until its ending is recorded."""
        ended = await self._leases.acquire(job.key)
        if ended is not None:  # another replica ended it while we waited
            await self._settle(job, self._from_store(job, ended))
            return
        async with self._leases.held(job.key):
            outcome = await self._decide(job)
            await self._settle(job, outcome)

    async def _decide(self, job: Job) -> Outcome:
        record = await self._store.get(job.key)
        if record is not None and record.status.is_terminal:  # e.g. cancelled meanwhile
            return self._from_store(job, record)
        if job.cancel_requested:
            return self._finished(job, _cancelled(job))
        _recall_previous_prompt(job, record)
        return await self._outcome(job)

    async def _outcome(self, job: Job) -> Outcome:
        """Run the pipeline and say how the task ended."""
        try:
            result = await self._pipeline.run(job)
        except asyncio.CancelledError:
            if not job.cancel_requested:
                raise
            _uncancel()
            return self._finished(job, _cancelled(job))
        except ConsumerError as exc:
            event = job.error_event(
                EventKind.FAILED, exc.code, exc.message, retriable=exc.retriable
            )
            return self._finished(job, event)
        except Exception:
            log.exception("task crashed", extra=ctx(task_id=job.task_id, user_id=job.user_id))
            return await self._crash_outcome(job)
        event = job.event(
            EventKind.COMPLETED, output_image_url=result.urls[0], output_image_urls=result.urls
        )
        return self._finished(job, event)

    def _finished(self, job: Job, event: TaskEvent) -> Finished:
        details = {"progress": event.progress, "instance": job.instance}
        return Finished(
            event=event,
            details={**details, "timings_ms": job.timings_ms},
            reply=job.reply,
            batch=job.batch,
        )

    def _from_store(self, job: Job, record: TaskRecord) -> Finished:
        """A redelivery of an ended task: its terminal event again (same event_id)."""
        if record.terminal_event is not None:
            return Finished(
                TaskEvent.model_validate_json(record.terminal_event),
                reply=job.reply,
                batch=job.batch,
            )
        return self._finished(job, _cancelled(job))  # cancelled while it waited in the queue

    async def _crash_outcome(self, job: Job) -> Outcome:
        """Requeue a crash, counted; on the last allowed delivery tell the owner first."""
        if await self.waited_for_store():
            return Returned("the task store was unreachable")
        reason = "processing crashed on every delivery"
        if delivery_count(job.handles[-1]) < self._delivery_limit:
            return Crashed(reason)
        event = job.error_event(EventKind.FAILED, ErrorCode.INTERNAL_ERROR, reason, retriable=False)
        return Crashed(reason, event=event, reply=job.reply)

    async def _settle(self, job: Job, outcome: Outcome) -> None:
        job.settling = True
        action = await self._settler.settle(list(job.handles), outcome)
        job.action = action
        if isinstance(outcome, Finished) and action is Action.ACK:
            event = outcome.event
            self._metrics.tasks.labels(job.style.name, event.status.value).inc()
            if event.status is TaskStatus.FAILED and event.error is not None:
                self._metrics.task_failures.labels(event.error.code.value).inc()
            log.info(
                "task %s",
                event.status.value,
                extra=ctx(
                    **job.log_fields(),
                    error=event.error.code if event.error else None,
                    timings_ms=job.timings_ms or None,
                ),
            )

    async def _forget(self, job: Job) -> None:
        """Drop the ended task from the running ones."""
        if self._running.get(job.key, (None,))[0] is job:
            del self._running[job.key]
        self._ended.set()
        self._ended = asyncio.Event()
        self._metrics.tasks_in_flight.set(len(self._running))
        if not self._running:
            self._idle.set()
        if job.action is not None:  # copies that attached while it ended: the same answer
            for message in job.handles:
                await apply(message, job.action)

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

    async def cancel(self, request: CancelRequest) -> int:
        """Cancel the owner's task or batch wherever it is; returns how many were found."""
        found = 0
        for job, task in list(self._running.values()):
            if job.user_id == request.user_id and _matches(job, request) and not job.settling:
                job.cancel_requested = True
                task.cancel()
                found += 1
        for task_id in await self._cancel_targets(request):
            key = task_key(request.user_id, task_id)
            if key in self._running:
                continue
            if (admission := self._admitting.get(key)) is not None:
                admission.cancelled = True
                found += 1
                continue
            found += await records.tombstone(self._store, request.user_id, task_id)
        return found

    async def _cancel_targets(self, request: CancelRequest) -> list[str]:
        if request.task_id is not None:
            return [request.task_id]
        user_id, batch_id = request.user_id, request.batch_id or ""
        return await records.batch_task_ids(self._store, user_id, batch_id)

    async def drain(self, grace_s: float) -> None:
        """Settle the fate of staged prompts (`_release_staged`), let running tasks finish for
        up to `grace_s`, then interrupt the rest (given back)."""
        self._release_staged()
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

    def _release_staged(self) -> None:
        """Prompts waiting in an instance's queue behind another, at the start of a shutdown.

        Adoptable: each is left on its instance for good, so the replica that gets the task
        after the grace adopts it (its record names the prompt) instead of running it again.
        Otherwise no replica could find it: its task is cancelled now, which deletes the prompt
        from the instance's queue and gives the delivery back, to run elsewhere at once.

        Prompts running when the shutdown starts are still interrupted at grace-over, adoptable
        or not: one that outlives the grace may be stuck, and an adopter neither counts it in
        the instance's capacity nor interrupts it on a deadline (`Pipeline._adopt`).
        """
        staged = [
            (run, task)
            for job, task in self._running.values()
            if (run := _staged_run(job)) is not None
        ]
        for run, task in staged:
            if self._prompts_adoptable:
                run.leave_for_adoption()
            else:
                task.cancel()
        fate = "left for adoption" if self._prompts_adoptable else "deleted, tasks given back"
        log.info("shutdown: %d staged prompt(s) %s", len(staged), fate)

    async def _interrupt_all(self) -> None:
        """Cancel every task (each interrupts its prompt), including any started meanwhile."""
        while self._running:
            tasks = {task for _, task in self._running.values()}
            for task in tasks:
                task.cancel()
            await asyncio.wait(tasks)


@dataclass
class _Admission:
    """A delivery being admitted: copies that arrive meanwhile attach to it. `style` is the
    one checked on arrival, which the task keeps whatever reloads follow."""

    handles: list[AbstractIncomingMessage]
    style: Style
    priority: Priority
    cancelled: bool = False


def _task_id(request: TransformRequest, message: AbstractIncomingMessage) -> str:
    """The request's task_id, else a valid AMQP message_id, else a fresh id."""
    if request.task_id is not None:
        return request.task_id
    if is_valid_id(message.message_id):
        return str(message.message_id)
    return uuid.uuid4().hex


def _cancelled(job: Job) -> TaskEvent:
    return job.error_event(
        EventKind.CANCELLED, ErrorCode.CANCELLED, records.CANCELLED_BY_OWNER, retriable=False
    )


def _staged_run(job: Job) -> PromptRun | None:
    """The job's prompt while it waits in an instance's queue: submitted, not started."""
    run = job.run
    if run is None or run.started or run.done or job.cancel_requested:
        return None
    return run


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
