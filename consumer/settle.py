"""How every delivery ends. Intake and dispatcher decide an outcome; `Settler` performs it.

An outcome says what happened to a request; `Settler.settle()` performs it for every handle
of the request (the delivery and any redelivered copies that attached to the same task), in a
task of its own: shielded from the caller's cancellation, under its own deadline. Whatever
fails on the way, each delivery still ends, on the broker method that says what happened:

    outcome    performed                                    if a step fails
    Finished   terminal record, event (+ reply), batch, ack  outage: nack; else reject+requeue
    Refused    rejection record, failed event, dead letter  outage: nack; else reject (DLX)
    Crashed    last delivery: failed event; reject+requeue  reject+requeue
    Returned   nack+requeue                                 (the channel is gone: moot)
    Handled    ack                                          reject+requeue

The methods follow RabbitMQ 4.3, which counts toward a quorum queue's `x-delivery-limit` only
failed deliveries: `reject(requeue=True)` means "this message failed" (counted), and
`nack(requeue=True)` means "not this message's fault" (a broker or store outage, shutdown,
a lease held elsewhere; not counted on 4.3). RabbitMQ 3.10 counts both.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from consumer import records, tracing
from consumer.errors import TransientError
from consumer.events import until_confirmed
from consumer.logs import ctx
from consumer.state import task_key
from contracts import ErrorCode, TaskStatus

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping, Sequence

    from aio_pika.abc import AbstractIncomingMessage

    from consumer.events import EventPublisher
    from consumer.jobs import BatchRef, Reply
    from consumer.metrics import Metrics
    from consumer.reporter import Reporter
    from consumer.state import TaskStateStore
    from contracts.models import TaskEvent

log = logging.getLogger(__name__)

DEFAULT_DEADLINE_S = 30.0
PING_TIMEOUT_S = 2.0
BATCH_CLAIM_TTL_S = 60.0  # an announcer that dies before publishing frees the claim after this
MAX_REASON_CHARS = 1000


class Action(enum.Enum):
    """What finally happens to a delivery on the broker."""

    ACK = "ack"  # done: the request ended (or was expanded, or handled)
    DEAD_LETTER = "dead_letter"  # reject(requeue=False): the queue's DLX takes it
    REQUEUE_FAILED = "requeue_failed"  # reject(requeue=True): it failed; counted everywhere
    RETURN = "return"  # nack(requeue=True): not its fault; not counted on RabbitMQ 4.3


@dataclass(frozen=True)
class Finished:
    """A task ended: `event` is its terminal event (completed, failed or cancelled)."""

    event: TaskEvent
    details: Mapping[str, Any] = field(default_factory=dict)  # more fields for the record
    reply: Reply | None = None
    batch: BatchRef | None = None


@dataclass(frozen=True)
class Refused:
    """The request is poison: dead-letter it with its reason, telling its sender if known."""

    code: ErrorCode
    reason: str
    event: TaskEvent | None = None  # the `failed` event, when a user_id could be read
    reply: Reply | None = None


@dataclass(frozen=True)
class Crashed:
    """Processing failed unexpectedly (a bug): requeue, counted by the delivery limit.

    `event` is set on the last allowed delivery: the owner is told before the queue
    dead-letters the message.
    """

    reason: str
    event: TaskEvent | None = None
    reply: Reply | None = None


@dataclass(frozen=True)
class Returned:
    """Not this message's fault (outage, shutdown): give it back without counting it."""

    reason: str


@dataclass(frozen=True)
class Handled:
    """Nothing more to do (a batch was expanded, a cancel was handled): ack."""


Outcome = Finished | Refused | Crashed | Returned | Handled


def fallback(outcome: Outcome, *, outage: bool) -> Action:
    """The action when performing `outcome` failed: never nothing."""
    if outage and isinstance(outcome, Finished | Refused):
        return Action.RETURN
    if isinstance(outcome, Refused):
        return Action.DEAD_LETTER
    if isinstance(outcome, Returned):
        return Action.RETURN
    return Action.REQUEUE_FAILED  # Finished after a bug, Crashed, Handled that failed


async def apply(message: AbstractIncomingMessage, action: Action) -> bool:
    """Tell the broker how `message` ended; False when its channel is gone (it comes back)."""
    if message.processed:
        return False
    try:
        match action:
            case Action.ACK:
                await message.ack()
            case Action.DEAD_LETTER:
                await message.reject(requeue=False)
            case Action.REQUEUE_FAILED:
                await message.reject(requeue=True)
            case Action.RETURN:
                await message.nack(requeue=True)
    except Exception as exc:  # a closed channel: the broker redelivers it; the task is idempotent
        log.debug("could not %s a delivery: %r", action.value, exc)
        return False
    return True


def safe_text(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` shortened and encodable as UTF-8 (lone surrogates escaped)."""
    short = text if len(text) <= limit else text[: limit - 3] + "..."
    return short.encode("utf-8", "backslashreplace").decode("utf-8")


def _described(outcome: Outcome) -> tuple[str, str | None]:
    """How `outcome` reads on a trace: its name, and its error code when it is a failure."""
    match outcome:
        case Finished(event=event):
            if event.status is TaskStatus.FAILED and event.error is not None:
                return event.status.value, event.error.code.value
            return event.status.value, None
        case Refused():
            return "refused", outcome.code.value
        case Crashed():
            return "crashed", ErrorCode.INTERNAL_ERROR.value
    return type(outcome).__name__.lower(), None  # Returned, Handled: nobody's failure


class Settler:
    """Performs outcomes. One per replica; `close()` waits for settles still running."""

    def __init__(
        self,
        *,
        store: TaskStateStore,
        reporter: Reporter,
        publisher: EventPublisher,
        metrics: Metrics,
        deadline_s: float = DEFAULT_DEADLINE_S,
    ) -> None:
        self._store = store
        self._reporter = reporter
        self._publisher = publisher
        self._metrics = metrics
        self._deadline_s = deadline_s
        self._running: set[asyncio.Task[Action]] = set()

    def __repr__(self) -> str:
        return f"<Settler running={len(self._running)} deadline_s={self._deadline_s}>"

    async def settle(self, handles: Iterable[AbstractIncomingMessage], outcome: Outcome) -> Action:
        """Perform `outcome` and end every handle; the action taken. Never raises but for the
        caller's own cancellation, which does not stop the settling."""
        task = asyncio.create_task(self._settle(list(handles), outcome), name="settle")
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return await asyncio.shield(task)

    async def close(self) -> None:
        """Wait for settles in progress (each is bounded by the deadline)."""
        if self._running:
            await asyncio.wait(set(self._running))

    async def _settle(self, handles: Sequence[AbstractIncomingMessage], outcome: Outcome) -> Action:
        try:
            async with asyncio.timeout(self._deadline_s):
                action = await self._perform(handles, outcome)
        except Exception as exc:
            outage = await self._is_outage(exc)
            action = fallback(outcome, outage=outage)
            log.warning(
                "could not settle as %s; %s instead: %r",
                type(outcome).__name__,
                action.value,
                exc,
                exc_info=not outage,
            )
        for message in handles:
            await apply(message, action)
        if handles:  # on the span of the delivery, or of the task, that decided it
            name, error_code = _described(outcome)
            tracing.mark_outcome(name, action.value, error_code)
        return action

    async def _perform(
        self, handles: Sequence[AbstractIncomingMessage], outcome: Outcome
    ) -> Action:
        match outcome:
            case Finished():
                await self._finish(outcome)
                return Action.ACK
            case Refused():
                await self._refuse(handles[0], outcome)
                return Action.ACK
            case Crashed():
                await self._crash(outcome)
                return Action.REQUEUE_FAILED
            case Returned():
                log.info("delivery returned: %s", outcome.reason)
                return Action.RETURN
            case Handled():
                return Action.ACK

    async def _finish(self, outcome: Finished) -> None:
        event = await records.store_terminal(self._store, outcome.event, outcome.details)
        await self._reporter.terminal(event, outcome.reply)
        if outcome.batch is not None:
            await self._end_batch_task(event, outcome.batch)

    async def _refuse(self, message: AbstractIncomingMessage, outcome: Refused) -> None:
        reason = safe_text(outcome.reason)
        if outcome.event is not None:
            await records.record_rejection(self._store, outcome.event)
            await self._reporter.terminal(outcome.event, outcome.reply)
        await until_confirmed(lambda: self._publisher.dead_letter(message, outcome.code, reason))
        self._metrics.messages_rejected.labels(outcome.code.value).inc()
        self._metrics.messages_dead_lettered.labels(outcome.code.value).inc()
        log.warning("message dead-lettered", extra=ctx(code=outcome.code.value, reason=reason))

    async def _crash(self, outcome: Crashed) -> None:
        """Tell the owner on the last delivery, best effort: whatever failed may fail again."""
        if outcome.event is None:
            return
        try:
            event = await records.store_terminal(self._store, outcome.event, {})
            await self._reporter.terminal(event, outcome.reply)
        except Exception:
            log.exception("could not announce a crash", extra=ctx(task_id=outcome.event.task_id))

    async def _end_batch_task(self, event: TaskEvent, batch: BatchRef) -> None:
        """Announce the batch once, from the replica whose task completed it."""
        batch_key = task_key(event.user_id, batch.batch_id)  # batch ids are scoped too
        won = await self._store.end_batch_task(
            batch_key, event.task_id, batch.size, BATCH_CLAIM_TTL_S
        )
        if not won:
            return
        done = await records.batch_completion(self._store, event, batch)
        await until_confirmed(lambda: self._reporter.publish(done))
        await self._store.confirm_batch_announced(batch_key)
        log.info("batch completed", extra=ctx(batch_id=batch.batch_id, user_id=event.user_id))

    async def _is_outage(self, exc: Exception) -> bool:
        """A failure that is nobody's fault: the broker or the store is unavailable."""
        if isinstance(exc, TransientError | TimeoutError | ConnectionError):
            return True
        try:
            async with asyncio.timeout(PING_TIMEOUT_S):
                return not await self._store.ping()
        except Exception:
            return True
