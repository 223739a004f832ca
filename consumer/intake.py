"""The AMQP side of the service: consume requests and cancels, hand them to the dispatcher.

- `style.transform` is consumed with `prefetch_count` = the healthy capacity of the pool
  (capped by MAX_CONCURRENT_TASKS): the queue holds the backlog, so other replicas share it.
  With no healthy instance, the consumer is cancelled until one comes back.
- Poison (bad JSON, wrong schema, unknown style, oversized, wrong content type) gets a
  `failed` event when a user_id can be read, is dead-lettered with its reason, then acked.
- Batches are expanded into single requests (published with confirms) before their ack.
- Cancels arrive on this replica's own control queue (a fanout reaches every replica).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import uuid
from typing import TYPE_CHECKING

import orjson

from consumer.broker import delivery_count
from consumer.errors import BrokerUnavailable, ConsumerError, InvalidRequest
from consumer.events import until_confirmed
from consumer.jobs import BatchRef, utcnow
from consumer.logs import ctx
from consumer.topology import declare_control_queue, declare_topology
from contracts import ErrorCode, EventKind, TaskStatus
from contracts.decode import InvalidMessage, decode_request
from contracts.ids import BATCH_ID_PATTERN, USER_ID_PATTERN, batch_task_id, is_valid_id
from contracts.models import (
    BatchTransformRequest,
    CancelRequest,
    TaskError,
    TaskEvent,
    TransformRequest,
)

if TYPE_CHECKING:
    from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

    from consumer.broker import Broker
    from consumer.comfy import InstancePool
    from consumer.dispatcher import Dispatcher
    from consumer.events import EventPublisher
    from consumer.metrics import Metrics
    from consumer.topology import Topology
    from consumer.workflows import StyleCatalog

log = logging.getLogger(__name__)
JSON_TYPES = {"application/json", "text/json"}
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
        publisher: EventPublisher,
        pool: InstancePool,
        catalog: StyleCatalog,
        metrics: Metrics,
        max_message_bytes: int,
        max_in_flight: int,
        delivery_limit: int,
    ) -> None:
        self._broker = broker
        self._topology = topology
        self._dispatcher = dispatcher
        self._publisher = publisher
        self._pool = pool
        self._catalog = catalog
        self._metrics = metrics
        self._max_bytes = max_message_bytes
        self._max_in_flight = max_in_flight
        self._delivery_limit = delivery_limit
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
        while not self._stopped:
            events = [self._pool.capacity_event, self._dispatcher.ended_event]
            try:
                if await self._follow_capacity():
                    events.pop()  # nothing to wait for but a change of capacity
            except Exception:  # the channel is reconnecting or gone: try again shortly
                log.exception("could not adjust the consumer; retrying")
                await asyncio.sleep(FOLLOW_RETRY_S)
                continue
            await _first_set(events)

    async def stop(self) -> None:
        """Stop taking new work (running tasks go on)."""
        self._stopped = True
        await self._cancel_consumer()

    def _desired_prefetch(self) -> int:
        return min(self._pool.healthy_capacity(), self._max_in_flight)

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
        self._metrics.messages_consumed.labels(message.routing_key or "").inc()
        try:
            await self._handle(message)
        except _Invalid as exc:
            await self._dead_letter(message, exc.code, exc.message, exc.user_id)
        except ConsumerError as exc:
            await self._dead_letter(message, exc.code, exc.message, _peek_user_id(message.body))
        except Exception:
            log.exception("intake crashed on a message; requeued (the delivery limit applies)")
            await self._crashed(message)

    async def _handle(self, message: AbstractIncomingMessage) -> None:
        request = self._decode(message)
        if isinstance(request, TransformRequest):
            await self._dispatcher.submit(message, request, _batch_ref(message))
        elif isinstance(request, BatchTransformRequest):
            await self._expand(message, request)
        else:
            raise InvalidRequest("cancel requests go to routing key 'cancel', not the work queue")

    def _decode(
        self, message: AbstractIncomingMessage
    ) -> TransformRequest | BatchTransformRequest | CancelRequest:
        size = len(message.body)
        if size > self._max_bytes:
            raise _Invalid(f"message is {size} bytes; the limit is {self._max_bytes}", None)
        content_type = (message.content_type or "application/json").split(";")[0].strip()
        if content_type.lower() not in JSON_TYPES:
            msg = f"content_type must be application/json, not {content_type!r}"
            raise _Invalid(msg, _peek_user_id(message.body))
        try:
            return decode_request(message.routing_key or "", message.body)
        except InvalidMessage as exc:
            raise _Invalid(str(exc), exc.user_id) from exc

    async def _expand(self, message: AbstractIncomingMessage, batch: BatchTransformRequest) -> None:
        self._catalog.get(batch.style_type)
        batch_id = batch.batch_id or message.message_id or uuid.uuid4().hex
        if not is_valid_id(batch_id, BATCH_ID_PATTERN):
            raise InvalidRequest(f"message_id {batch_id!r} cannot be a batch_id; set batch_id")
        size = len(batch.image_urls)
        await self._dispatcher.register_batch(batch_id, batch)
        for index, url in enumerate(batch.image_urls):
            request = TransformRequest(
                task_id=batch_task_id(batch_id, index),
                image_url=url,
                **batch.model_dump(exclude={"batch_id", "image_urls"}, exclude_none=True),
            )
            body = request.model_dump_json(exclude_none=True).encode()
            headers = {"x-batch-id": batch_id, "x-batch-index": index, "x-batch-size": size}
            publish = functools.partial(
                self._publisher.publish_request,
                "transform",
                body,
                headers=headers,
                reply_to=message.reply_to,
                correlation_id=message.correlation_id,
            )
            await until_confirmed(publish)
        await message.ack()
        log.info("batch expanded", extra=ctx(batch_id=batch_id, user_id=batch.user_id, size=size))

    async def _crashed(self, message: AbstractIncomingMessage) -> None:
        """Requeue (counted); on the last allowed delivery tell the user first, if we can."""
        if await self._dispatcher.waited_for_store():
            await message.reject(requeue=True)  # an outage, not this message's fault
            return
        user_id = _peek_user_id(message.body)
        if delivery_count(message) >= self._delivery_limit and user_id is not None:
            reason = "processing crashed on every delivery; dead-lettered"
            event = _failed_event(message, user_id, ErrorCode.INTERNAL_ERROR, reason)
            try:
                await self._publisher.publish_event(event)
            except BrokerUnavailable as exc:
                log.warning("could not announce the crash: %s", exc)
        await message.reject(requeue=True)

    async def _dead_letter(
        self, message: AbstractIncomingMessage, code: ErrorCode, reason: str, user_id: str | None
    ) -> None:
        if user_id is not None:
            event = _failed_event(message, user_id, code, reason)
            await self._dispatcher.record_rejection(event)
            await until_confirmed(lambda: self._publisher.publish_event(event))
        await until_confirmed(lambda: self._publisher.dead_letter(message, code, reason))
        await message.ack()
        self._metrics.messages_rejected.labels(code.value).inc()
        self._metrics.messages_dead_lettered.labels(code.value).inc()
        log.warning("message dead-lettered", extra=ctx(code=code.value, reason=reason[:300]))

    async def _on_control(self, message: AbstractIncomingMessage) -> None:
        try:
            request = _decode_cancel(message.body)
            found = await self._dispatcher.cancel(request)
            log.info("cancel handled", extra=ctx(user_id=request.user_id, found=found))
        except InvalidMessage as exc:
            self._metrics.messages_rejected.labels("invalid_request").inc()
            log.warning("invalid cancel ignored", extra=ctx(reason=str(exc)[:300]))
        except Exception:
            log.exception("cancel failed")
        await message.ack()


class _Invalid(InvalidRequest):
    """An invalid request whose user_id (if any could be read) is kept for the failed event."""

    def __init__(self, message: str, user_id: str | None) -> None:
        super().__init__(message)
        self.user_id = user_id


async def _first_set(events: list[asyncio.Event]) -> None:
    """Return when any of `events` is set."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


def _decode_cancel(body: bytes) -> CancelRequest:
    request = decode_request("cancel", body)
    if not isinstance(request, CancelRequest):
        raise InvalidMessage("not a cancel request", None)
    return request


def _peek_user_id(body: bytes) -> str | None:
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    user_id = value.get("user_id") if isinstance(value, dict) else None
    return user_id if is_valid_id(user_id, USER_ID_PATTERN) else None


def _peek_task_id(message: AbstractIncomingMessage) -> str:
    try:
        value = orjson.loads(message.body)
    except orjson.JSONDecodeError:
        value = None
    task_id = value.get("task_id") if isinstance(value, dict) else None
    for candidate in (task_id, message.message_id):
        if is_valid_id(candidate):
            return str(candidate)
    return uuid.uuid4().hex


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
    headers = message.headers or {}
    batch_id, index, size = (headers.get(name) for name in BATCH_HEADERS)
    if isinstance(batch_id, str) and isinstance(index, int) and isinstance(size, int):
        return BatchRef(batch_id=batch_id, index=index, size=size)
    return None
