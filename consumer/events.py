"""Confirmed publishing: task events, RPC replies, dead letters and expanded requests.

Every publish waits for the broker's confirm under `publish_timeout_s` (aio-pika can wait
forever without one, e.g. while a memory alarm blocks the connection or a robust channel
reconnects). A timeout, a `basic.nack` or a `basic.return` (mandatory, unroutable) raises
`BrokerUnavailable`, so the caller does not ack the message it is working on.

aiormq matches returns to publishes by `message_id`: never publish two messages with the
same `message_id` concurrently on one channel.
"""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from typing import TYPE_CHECKING, Any

import aiormq
from aio_pika import DeliveryMode, Exchange, ExchangeType, Message

from consumer import tracing
from consumer.errors import BrokerUnavailable
from contracts.enums import EventKind
from contracts.ids import batch_completed_routing_key, task_event_routing_key
from contracts.models import BatchCompletedEvent

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Mapping

    from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage

    from consumer.topology import Topology
    from contracts.enums import ErrorCode
    from contracts.models import Event

log = logging.getLogger(__name__)

JSON = "application/json"
APP_ID = "style-consumer"
MAX_ERROR_MESSAGE_CHARS = 1000
MAX_QUEUE_NAME_BYTES = 255
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"
_OWN_HEADER_PREFIXES = ("x-error-", "x-original-")
RETRY_FIRST_S = 0.1
RETRY_MAX_S = 5.0
_BROKER_ERRORS = (
    TimeoutError,
    ConnectionError,
    aiormq.exceptions.AMQPError,
    aiormq.exceptions.ChannelInvalidStateError,
)


class ReplyPolicy:
    """Which `reply_to` queues a request may name: Direct Reply-to, and REPLY_TO_PATTERN.

    A `reply_to` is written by the sender, so without a policy a request could inject terminal
    events into any queue on the broker (another application's included).
    """

    def __init__(self, pattern: str | None = None) -> None:
        self._pattern = re.compile(pattern) if pattern else None

    def __repr__(self) -> str:
        shown = self._pattern.pattern if self._pattern else None
        return f"<ReplyPolicy direct-reply-to pattern={shown!r}>"

    def allows(self, reply_to: str) -> bool:
        if not 0 < len(reply_to.encode("utf-8", "surrogatepass")) <= MAX_QUEUE_NAME_BYTES:
            return False
        if reply_to == DIRECT_REPLY_TO or reply_to.startswith(f"{DIRECT_REPLY_TO}."):
            return True
        return self._pattern is not None and self._pattern.fullmatch(reply_to) is not None


class Unroutable(BrokerUnavailable):
    """The broker returned a mandatory publication: nothing is bound for its routing key."""


class EventPublisher:
    """Publishes on one confirmed channel (`Broker.publish_channel`)."""

    def __init__(
        self, channel: AbstractChannel, topology: Topology, publish_timeout_s: float
    ) -> None:
        self._channel = channel
        self._topology = topology
        self._timeout_s = publish_timeout_s
        self._events = self._exchange(topology.events, ExchangeType.TOPIC)
        self._requests = self._exchange(topology.requests, ExchangeType.DIRECT)
        self._dlx = self._exchange(topology.dlx, ExchangeType.FANOUT)

    def _exchange(self, name: str, kind: ExchangeType) -> AbstractExchange:
        """A handle for publishing only; `declare_topology` declares the exchange itself."""
        return Exchange(self._channel, name, kind, durable=True)

    async def publish_event(self, event: Event) -> None:
        """Publish to the events exchange, mandatory and (except `progress`) persistent."""
        message = Message(
            event.model_dump_json().encode(),
            content_type=JSON,
            delivery_mode=_delivery_mode(event),
            message_id=event.event_id,
            timestamp=event.timestamp,
            type=str(event.event),
            app_id=APP_ID,
            headers=_event_headers(event),
        )
        await self._publish(self._events, message, event_routing_key(event))

    async def publish_reply(
        self,
        reply_to: str,
        correlation_id: str | None,
        event: Event,
    ) -> None:
        """Answer a request's `reply_to` (a queue or Direct Reply-to) via the default exchange.

        A requester that has gone away is not an error worth retrying: the reply is dropped
        and logged. So is a `reply_to` naming one of our own queues.
        """
        if not self._reply_target_allowed(reply_to):
            log.warning("reply_to %r refused: it names one of our own queues", reply_to)
            return
        message = Message(
            event.model_dump_json().encode(),
            content_type=JSON,
            correlation_id=correlation_id,
            message_id=uuid.uuid4().hex,
            timestamp=event.timestamp,
            type=str(event.event),
            app_id=APP_ID,
            headers=_event_headers(event),
        )
        try:
            await self._publish(self._channel.default_exchange, message, reply_to)
        except Unroutable:
            log.warning("reply dropped: reply_to %r no longer exists", reply_to)

    def _reply_target_allowed(self, reply_to: str) -> bool:
        own_prefix = f"{self._topology.prefix}."
        size_ok = 0 < len(reply_to.encode()) <= MAX_QUEUE_NAME_BYTES
        return size_ok and not reply_to.startswith(own_prefix)

    async def dead_letter(
        self, message: AbstractIncomingMessage, code: ErrorCode, reason: str
    ) -> None:
        """Republish `message` (body, properties) to the DLX with the reason in headers.

        The caller acks the original afterwards; if this raises, it must not. Dropped on
        purpose: `expiration` (it would expire in the dead queue), `user_id` (the broker
        checks it against our login), the queue's own `x-delivery-count`, and any `x-error-*`
        or `x-original-*` the sender wrote (those are ours to set).
        """
        kept = {
            k: v
            for k, v in message.headers.items()
            if k != "x-delivery-count" and not k.startswith(_OWN_HEADER_PREFIXES)
        }
        headers: dict[str, Any] = {
            **kept,
            "x-error-code": str(code),
            "x-error-message": reason[:MAX_ERROR_MESSAGE_CHARS],
            "x-original-exchange": message.exchange or "",
            "x-original-routing-key": message.routing_key or "",
        }
        copy = Message(
            message.body,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=DeliveryMode.PERSISTENT,
            priority=message.priority,
            correlation_id=message.correlation_id,
            reply_to=message.reply_to,
            message_id=message.message_id or uuid.uuid4().hex,
            timestamp=message.timestamp,
            type=message.type,
            app_id=message.app_id,
        )
        await self._publish(self._dlx, copy, message.routing_key or "")

    async def publish_request(
        self,
        routing_key: str,
        body: bytes,
        *,
        headers: Mapping[str, Any] | None = None,
        message_id: str | None = None,
        correlation_id: str | None = None,
        reply_to: str | None = None,
    ) -> None:
        """Publish a persistent JSON request to the requests exchange (e.g. a batch's tasks)."""
        message = Message(
            body,
            headers=tracing.inject(dict(headers or {})),  # a batch's tasks join its trace
            content_type=JSON,
            delivery_mode=DeliveryMode.PERSISTENT,
            message_id=message_id or uuid.uuid4().hex,
            correlation_id=correlation_id,
            reply_to=reply_to,
            app_id=APP_ID,
        )
        await self._publish(self._requests, message, routing_key)

    async def _publish(self, exchange: AbstractExchange, message: Message, key: str) -> None:
        """Publish mandatory and wait for the confirm; every broker failure -> BrokerUnavailable."""
        target = f"exchange {exchange.name!r} key {key!r}"
        try:
            # The outer deadline also covers waiting for a reconnecting robust channel.
            async with asyncio.timeout(self._timeout_s):
                await exchange.publish(message, key, mandatory=True, timeout=self._timeout_s)
        except aiormq.exceptions.PublishError as exc:
            raise Unroutable(f"unroutable: nothing is bound for {target}") from exc
        except aiormq.exceptions.DeliveryError as exc:
            raise BrokerUnavailable(f"broker refused (nack) the publish to {target}") from exc
        except TimeoutError as exc:
            raise BrokerUnavailable(
                f"no confirm within {self._timeout_s}s for {target} (blocked or reconnecting?)"
            ) from exc
        except _BROKER_ERRORS as exc:
            raise BrokerUnavailable(f"publish to {target} failed: {exc!r}") from exc


def event_routing_key(event: Event) -> str:
    """`task.<event>.<user_id>` or `batch.completed.<user_id>`, refusing unsafe words."""
    if isinstance(event, BatchCompletedEvent):
        return batch_completed_routing_key(event.user_id)
    return task_event_routing_key(event.event.value, event.user_id)


def _delivery_mode(event: Event) -> DeliveryMode:
    if event.event == EventKind.PROGRESS:
        return DeliveryMode.NOT_PERSISTENT
    return DeliveryMode.PERSISTENT


def _event_headers(event: Event) -> dict[str, Any]:
    """Ids a subscriber can filter or deduplicate on without parsing the body, and the trace
    context (`traceparent`, `tracestate`) a subscriber continues."""
    if isinstance(event, BatchCompletedEvent):
        return tracing.inject({"event": event.event, "batch_id": event.batch_id})
    headers = {"event": event.event.value, "task_id": event.task_id}
    if event.batch_id is not None:
        headers["batch_id"] = event.batch_id
    return tracing.inject(headers)


async def until_confirmed(publish: Callable[[], Awaitable[None]]) -> None:
    """Retry `publish` with backoff while the broker is unavailable (blocked, reconnecting).

    Only cancellation (shutdown, lost channel) ends the wait; an unroutable publication is a
    missing binding, not a transient state, and is raised at once.
    """
    delay_s = RETRY_FIRST_S
    while True:
        try:
            await publish()
        except Unroutable:
            raise
        except BrokerUnavailable as exc:
            log.warning("publish not confirmed, retrying in %.1fs: %s", delay_s, exc)
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, RETRY_MAX_S)
        else:
            return
