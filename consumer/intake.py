"""The AMQP side of the service: consume requests and cancels, hand them to the dispatcher.

- `style.transform` is consumed with `prefetch_count` = the healthy capacity of the pool
  (capped by MAX_CONCURRENT_TASKS): the queue holds the backlog, so other replicas share it.
  With no healthy instance, the consumer is cancelled until one comes back.
- Poison (bad JSON, wrong schema, unknown style, oversized, wrong content type) gets a
  `failed` event when a user_id can be read, is dead-lettered with its reason, then acked.
- `style.transform.bulk` is pulled into the room interactive work leaves (`consumer.bulk`).
  A request whose `priority` names the other class is moved to that class's queue.
- Batches become single requests (published with confirms) before their ack: a bulk batch a
  slice at a time, so that users' batches interleave (`consumer.batches`).
- Cancels arrive on this replica's own control queue (a fanout reaches every replica).
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import TYPE_CHECKING, Any

from consumer import records, tracing
from consumer.batches import BatchFeeder
from consumer.broker import delivery_count, header_int
from consumer.bulk import BulkFeed, first_set
from consumer.comfy import Priority
from consumer.errors import ConsumerError, InvalidRequest
from consumer.events import APP_ID, until_confirmed
from consumer.jobs import BatchRef, Reply, utcnow
from consumer.logs import ctx
from consumer.settings import SchedulerPolicy
from consumer.settle import Crashed, Handled, Outcome, Refused, Returned, safe_text
from consumer.topology import (
    BULK_KEY,
    BULK_KEYS,
    CANCEL_KEY,
    INTERACTIVE_KEY,
    TRANSFORM_KEYS,
    declare_control_queue,
    declare_topology,
)
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.decode import InvalidMessage, decode_request
from contracts.ids import BATCH_ID_PATTERN, MAX_BATCH_SIZE, USER_ID_PATTERN, is_valid_id
from contracts.models import (
    BatchTransformRequest,
    CancelRequest,
    TaskError,
    TaskEvent,
    TransformRequest,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue
    from opentelemetry.trace import Tracer

    from consumer.broker import Broker
    from consumer.comfy import InstancePool
    from consumer.dispatcher import Dispatcher
    from consumer.events import EventPublisher, ReplyPolicy
    from consumer.metrics import Metrics
    from consumer.settle import Settler
    from consumer.state import TaskStateStore
    from consumer.topology import Topology
    from consumer.workflows import StyleLookup

log = logging.getLogger(__name__)
JSON_TYPES = frozenset({"application/json", "text/json"})
IDENTITY_ENCODINGS = frozenset({"", "identity", "utf-8", "utf8"})  # no compression
REQUEST_KINDS = frozenset({*TRANSFORM_KEYS, CANCEL_KEY, *BULK_KEYS})
BATCH_HEADERS = ("x-batch-id", "x-batch-index", "x-batch-size")
CANCEL_TIMEOUT_S = 5.0
FOLLOW_RETRY_S = 1.0


class Intake:
    """Consumes the work queue and the control queue for the life of the service."""

    def __init__(
        self,
        *,
        broker: Broker,
        topology: Topology,
        dispatcher: Dispatcher,
        settler: Settler,
        store: TaskStateStore,
        publisher: EventPublisher,
        replies: ReplyPolicy,
        pool: InstancePool,
        catalog: StyleLookup,
        metrics: Metrics,
        max_message_bytes: int,
        max_in_flight: int,
        delivery_limit: int,
        policy: SchedulerPolicy = SchedulerPolicy.FAIR,
        window: int = 2,
        batch_slice: int = 4,
        bulk_poll_s: float = 1.0,
        tracer: Tracer = tracing.NO_TRACER,
    ) -> None:
        self._tracer = tracer
        self._broker = broker
        self._topology = topology
        self._dispatcher = dispatcher
        self._settler = settler
        self._store = store
        self._publisher = publisher
        self._replies = replies
        self._pool = pool
        self._catalog = catalog
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._max_in_flight = max_in_flight
        self._delivery_limit = delivery_limit
        self._fair = policy is SchedulerPolicy.FAIR
        self._window = window
        self._bulk = BulkFeed(
            broker=broker,
            queue_name=topology.bulk,
            room=self._bulk_room,
            changes=self._change_events,
            handle=self._on_message,
            poll_s=bulk_poll_s,
        )
        self._batches = BatchFeeder(
            publisher=publisher,
            store=store,
            slice_size=batch_slice if self._fair else None,
            on_bulk_published=self._bulk.nudge,
        )
        self._channel: AbstractChannel | None = None
        self._queue: AbstractQueue | None = None
        self._consumer_tag: str | None = None
        self._prefetch = 0
        self._stopped = False
        self.consuming = asyncio.Event()

    def __repr__(self) -> str:
        return f"<Intake prefetch={self._prefetch} consuming={self.consuming.is_set()}>"

    async def run(self) -> None:
        """Declare the topology, consume cancels, and follow pool capacity until cancelled."""
        self._channel = await self._broker.consume_channel(prefetch_count=1)
        declared = await declare_topology(self._channel, self._topology, self._delivery_limit)
        self._queue = declared.queues[self._topology.transform]
        control_channel = await self._broker.consume_channel(prefetch_count=32)
        control = await declare_control_queue(control_channel, self._topology)
        await control.consume(self._on_control)
        async with asyncio.TaskGroup() as group:
            group.create_task(self._bulk.run(), name="bulk feed")
            await self._follow()

    async def _follow(self) -> None:
        while not self._stopped:
            events = self._change_events()
            try:
                if await self._follow_capacity():
                    events.pop()  # nothing to wait for but a change of capacity
            except Exception:  # the channel is reconnecting or gone: try again shortly
                log.exception("could not adjust the consumer; retrying")
                await asyncio.sleep(FOLLOW_RETRY_S)
                continue
            await first_set(events)

    async def stop(self) -> None:
        """Stop taking new work (running tasks go on); what was taken is handed over."""
        self._stopped = True
        self._bulk.stop()
        await self._cancel_consumer()
        await self._bulk.wait_handled()

    def _change_events(self) -> list[asyncio.Event]:
        """Set when capacity may have changed: the pool's, or a task ended (take them before
        reading capacity)."""
        return [self._pool.capacity_event, self._dispatcher.ended_event]

    def _desired_prefetch(self) -> int:
        return min(self._pool.healthy_capacity(), self._max_in_flight)

    def _bulk_room(self) -> int:
        """Bulk tasks this replica may take now: up to SCHEDULER_WINDOW beyond its slots."""
        if self._stopped or self._pool.healthy_capacity() == 0:
            return 0
        return self._desired_prefetch() + self._window - self._dispatcher.in_flight

    async def _follow_capacity(self) -> bool:
        """Make the consumer's window follow the pool; False while waiting to grow it.

        QoS applies per consumer, so a new window cannot count what older consumers still
        hold: shrinking subtracts everything in hand, and growing waits until older
        consumers' deliveries are done (then overshoots by at most the old window, briefly).
        """
        desired, tag = self._desired_prefetch(), self._consumer_tag
        if desired == 0 or self._stopped:
            if tag is not None and not self._stopped:
                log.warning("no healthy ComfyUI instance: not consuming")
            await self._cancel_consumer()
            self._prefetch = 0
            return True
        if tag is not None and desired == self._prefetch:
            return True
        growing = tag is not None and desired > self._prefetch
        if growing and self._dispatcher.held_outside(tag) > 0:
            return False
        window = desired if growing else max(1, desired - self._dispatcher.in_flight)
        await self._cancel_consumer()
        await self._consume(window)
        return window == desired

    async def _consume(self, window: int) -> None:
        if self._queue is None or self._channel is None:
            return
        await self._channel.set_qos(prefetch_count=window)
        self._consumer_tag = await self._queue.consume(self._on_message)
        self._prefetch = window
        self.consuming.set()
        log.info("consuming with prefetch %d", window)

    async def _cancel_consumer(self) -> None:
        self.consuming.clear()
        if self._consumer_tag is None or self._queue is None:
            return
        tag, self._consumer_tag = self._consumer_tag, None
        try:
            # A robust channel waits for a reconnect before cancelling: do not wait forever.
            async with asyncio.timeout(CANCEL_TIMEOUT_S):
                await self._queue.cancel(tag)
        except Exception as exc:  # the channel is gone; the robust one drops the consumer too
            log.debug("consumer cancel failed: %s", exc)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        """Decide how the delivery ends (or hand it to a task), then end it: always."""
        kind = _kind(message)
        self._metrics.messages_consumed.labels(kind).inc()
        with tracing.delivery_span(self._tracer, message, kind):  # its task's span's parent
            outcome = await self._decide(message)
            if outcome is not None:
                await self._settler.settle([message], outcome)

    async def _decide(self, message: AbstractIncomingMessage) -> Outcome | None:
        """The outcome of a delivery, or None once a task owns it. Never raises."""
        try:
            return await self._handle(message)
        except _Invalid as exc:
            return self._refused(message, exc.code, exc.message, exc.user_id)
        except ConsumerError as exc:
            return self._refused(message, exc.code, exc.message, _peek_user_id(message.body))
        except Exception:  # RecursionError and MemoryError included: a bug, or worse input
            log.exception("intake crashed on a message; requeued (the delivery limit applies)")
            return await self._crashed(message)

    async def _handle(self, message: AbstractIncomingMessage) -> Outcome | None:
        request = self._decode(message)
        if isinstance(request, TransformRequest):
            priority = _priority(message, request)
            if self._fair and (priority is Priority.BULK) != (message.routing_key == BULK_KEY):
                await self._move(message, priority)
                return Handled()
            batch = await self._trusted_batch(message, request)
            reply = self._reply(message)
            return await self._dispatcher.submit(message, request, batch, reply, priority)
        if isinstance(request, BatchTransformRequest):
            self._catalog.get(request.style_type)
            batch_id = request.batch_id or _valid_message_id(message, BATCH_ID_PATTERN)
            await self._batches.feed(message, request, batch_id, self._reply(message))
            return Handled()
        raise InvalidRequest("cancel requests go to routing key 'cancel', not the work queue")

    async def _move(self, message: AbstractIncomingMessage, priority: Priority) -> None:
        """Publish the request, unchanged, to the queue of its priority class (then acked).

        Our reserved `x-` headers are kept only on a message we published ourselves; the
        broker's (`x-delivery-count`...) never, so the copy starts its own count.
        """
        ours = message.app_id == APP_ID
        headers = {
            name: value
            for name, value in (message.headers or {}).items()
            if not name.startswith("x-") or (ours and name in BATCH_HEADERS)
        }
        key = BULK_KEY if priority is Priority.BULK else INTERACTIVE_KEY
        await until_confirmed(
            lambda: self._publisher.publish_request(
                key,
                message.body,
                headers=headers,
                message_id=message.message_id,
                correlation_id=message.correlation_id,
                reply_to=message.reply_to,
            )
        )
        if priority is Priority.BULK:
            self._bulk.nudge()

    def _decode(
        self, message: AbstractIncomingMessage
    ) -> TransformRequest | BatchTransformRequest | CancelRequest:
        size = len(message.body)
        if size > self._max_bytes:
            raise _Invalid(f"message is {size} bytes; the limit is {self._max_bytes}", None)
        _check_encoding(message)
        try:
            return decode_request(message.routing_key or "", message.body)
        except InvalidMessage as exc:
            raise _Invalid(str(exc), exc.user_id) from exc

    async def _trusted_batch(
        self, message: AbstractIncomingMessage, request: TransformRequest
    ) -> BatchRef | None:
        """Batch headers count only on a request we published for a batch of the same owner."""
        ref = _batch_ref(message)
        if ref is None or message.app_id != APP_ID:
            return None
        if await records.batch_owned(self._store, ref, request):
            return ref
        log.warning("batch headers ignored", extra=ctx(batch_id=ref.batch_id[:64]))
        return None

    def _reply(self, message: AbstractIncomingMessage) -> Reply | None:
        reply_to = message.reply_to
        if not reply_to:
            return None
        if not self._replies.allows(reply_to):
            self._metrics.replies_refused.inc()
            log.warning("reply_to ignored", extra=ctx(reply_to=safe_text(reply_to, 300)))
            return None
        return Reply(reply_to, message.correlation_id)

    async def _crashed(self, message: AbstractIncomingMessage) -> Outcome:
        """Requeue (counted); on the last allowed delivery tell the user first, if we can."""
        if await self._dispatcher.waited_for_store():
            return Returned("the task store was unreachable")
        reason = "processing crashed on every delivery; dead-lettered"
        user_id = _peek_user_id(message.body)
        if delivery_count(message) < self._delivery_limit or user_id is None:
            return Crashed(reason)
        event = _failed_event(message, user_id, ErrorCode.INTERNAL_ERROR, reason)
        return Crashed(reason, event=event, reply=self._reply(message))

    def _refused(
        self, message: AbstractIncomingMessage, code: ErrorCode, reason: str, user_id: str | None
    ) -> Refused:
        reason = safe_text(reason)
        if user_id is None:
            return Refused(code, reason)
        event = _failed_event(message, user_id, code, reason)
        return Refused(code, reason, event=event, reply=self._reply(message))

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        with tracing.delivery_span(self._tracer, message, "cancel"):
            await self._cancel(message)

    async def _cancel(self, message: AbstractIncomingMessage) -> None:
        try:
            request = _decode_cancel(message.body)
            found = await self._dispatcher.cancel(request)
            log.info("cancel handled", extra=ctx(user_id=request.user_id, found=found))
        except InvalidMessage as exc:
            self._metrics.messages_rejected.labels("invalid_request").inc()
            log.warning("invalid cancel ignored", extra=ctx(reason=safe_text(str(exc), 300)))
        except Exception:  # a cancel is best effort: it must not loop on every replica
            log.exception("cancel failed")
        await self._settler.settle([message], Handled())


class _Invalid(InvalidRequest):
    """An invalid request whose user_id (if any could be read) is kept for the failed event."""

    def __init__(self, message: str, user_id: str | None) -> None:
        super().__init__(message)
        self.user_id = user_id


def _decode_cancel(body: bytes) -> CancelRequest:
    request = decode_request("cancel", body)
    if not isinstance(request, CancelRequest):
        raise InvalidMessage("not a cancel request", None)
    return request


def _peek(body: bytes) -> dict[str, Any]:
    """The body's top-level object, leniently (for telling the sender why it was refused).

    The standard library's parser, not orjson: it keeps strings with lone surrogates, and
    numbers stay text (a 5000-digit one does not fail), so a refused body still names its
    sender and task.
    """
    try:
        value = json.loads(body, parse_int=str, parse_float=str, parse_constant=str)
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


def _peek_user_id(body: bytes) -> str | None:
    user_id = _peek(body).get("user_id")
    return user_id if is_valid_id(user_id, USER_ID_PATTERN) else None


def _peek_task_id(message: AbstractIncomingMessage) -> str:
    task_id = _peek(message.body).get("task_id")
    return str(task_id) if is_valid_id(task_id) else _valid_message_id(message)


def _valid_message_id(message: AbstractIncomingMessage, pattern: str | None = None) -> str:
    """The AMQP message_id when it is a valid id (task or batch), else a fresh one."""
    message_id = message.message_id
    valid = is_valid_id(message_id, pattern) if pattern else is_valid_id(message_id)
    return str(message_id) if valid else uuid.uuid4().hex


def _kind(message: AbstractIncomingMessage) -> str:
    """A bounded metric label for the routing key a request came with."""
    key = message.routing_key or ""
    return key if key in REQUEST_KINDS else "other"


def _check_encoding(message: AbstractIncomingMessage) -> None:
    """JSON only, uncompressed: the content_type and content_encoding properties."""
    content_type = (message.content_type or "application/json").split(";")[0].strip()
    if content_type.lower() not in JSON_TYPES:
        msg = f"content_type must be application/json, not {safe_text(content_type, 100)!r}"
        raise _Invalid(msg, _peek_user_id(message.body))
    encoding = (message.content_encoding or "").strip().lower()
    if encoding not in IDENTITY_ENCODINGS:
        msg = f"content_encoding {safe_text(encoding, 100)!r} is not supported (send plain JSON)"
        raise _Invalid(msg, _peek_user_id(message.body))


def _failed_event(
    message: AbstractIncomingMessage, user_id: str, code: ErrorCode, reason: str
) -> TaskEvent:
    now = utcnow()
    return TaskEvent(
        event=EventKind.FAILED,
        event_id=uuid.uuid4().hex,
        task_id=_peek_task_id(message),
        user_id=user_id,
        status=TaskStatus.FAILED,
        progress=0,
        attempt=1,
        error=TaskError(code=code, message=reason, retriable=False),
        created_at=now,
        timestamp=now,
    )


def _batch_ref(message: AbstractIncomingMessage) -> BatchRef | None:
    """The batch headers, when they are well formed (whether to trust them is asked later)."""
    batch_id = (message.headers or {}).get("x-batch-id")
    index, size = header_int(message, "x-batch-index"), header_int(message, "x-batch-size")
    if not (is_valid_id(batch_id, BATCH_ID_PATTERN) and index is not None and size is not None):
        return None
    if not 0 <= index < size <= MAX_BATCH_SIZE:
        return None
    return BatchRef(batch_id=str(batch_id), index=index, size=size)


def _priority(message: AbstractIncomingMessage, request: TransformRequest) -> Priority:
    """The request's class: its `priority`, else the queue it was published to."""
    if request.priority is not None:
        return Priority.BULK if request.priority == "bulk" else Priority.INTERACTIVE
    return Priority.BULK if message.routing_key == BULK_KEY else Priority.INTERACTIVE
