"""EventPublisher against a real broker: routing, properties, unrouted, dead letters, replies."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import aio_pika
import pytest
from aio_pika import DeliveryMode, Message
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue

from consumer.events import EventPublisher, Unroutable, event_routing_key
from consumer.topology import Topology
from contracts import BatchCompletedEvent, ErrorCode, EventKind, TaskEvent, TaskStatus

pytestmark = pytest.mark.connected

RECEIVE_TIMEOUT_S = 5.0
USER = "user-42"
DIRECT_REPLY_TO = "amq.rabbitmq.reply-to"


def task_event(kind: EventKind = EventKind.ACCEPTED, status: TaskStatus = TaskStatus.PENDING):
    """A valid TaskEvent with a fresh event_id."""
    now = datetime.now(UTC)
    return TaskEvent(
        event=kind,
        event_id=uuid.uuid4().hex,
        task_id="order-1001",
        user_id=USER,
        status=status,
        progress=0,
        attempt=1,
        created_at=now,
        timestamp=now,
    )


async def next_message(queue: AbstractQueue, *, no_ack: bool = False) -> AbstractIncomingMessage:
    """The next delivery of `queue` (acked), or fail after RECEIVE_TIMEOUT_S."""
    async with asyncio.timeout(RECEIVE_TIMEOUT_S), queue.iterator(no_ack=no_ack) as messages:
        async for message in messages:
            if not no_ack:
                await message.ack()
            return message
    raise AssertionError("queue iterator ended")


async def subscriber(channel: AbstractChannel, topology: Topology, pattern: str) -> AbstractQueue:
    """An exclusive queue bound to the events exchange with `pattern`."""
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(topology.events, pattern)
    return queue


def test_routing_keys_follow_the_contract() -> None:
    """Task events route as task.<event>.<user_id>, batch completions as batch.completed.<user>."""
    batch = BatchCompletedEvent(
        batch_id="album-7",
        user_id=USER,
        style_type="anime",
        task_ids=["album-7-0"],
        completed=1,
        failed=0,
        cancelled=0,
    )
    assert event_routing_key(task_event()) == "task.accepted.user-42"
    assert event_routing_key(batch) == "batch.completed.user-42"


async def test_event_reaches_bound_subscriber(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology
) -> None:
    """A subscriber bound to task.*.<user> gets the event, persistent JSON, id = event_id."""
    queue = await subscriber(admin_channel, declared, f"task.*.{USER}")
    event = task_event()
    await publisher.publish_event(event)
    message = await next_message(queue)
    assert message.routing_key == f"task.accepted.{USER}"
    assert (message.content_type, message.delivery_mode) == ("application/json", 2)
    assert message.message_id == event.event_id
    assert message.headers["task_id"] == "order-1001"
    assert TaskEvent.model_validate_json(message.body) == event


async def test_progress_event_is_not_persistent(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology
) -> None:
    """Progress events are transient: losing one on a broker restart is acceptable."""
    queue = await subscriber(admin_channel, declared, "task.progress.#")
    await publisher.publish_event(task_event(EventKind.PROGRESS, TaskStatus.PROCESSING))
    message = await next_message(queue)
    assert message.delivery_mode == DeliveryMode.NOT_PERSISTENT


async def test_unrouted_event_lands_in_unrouted_queue(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology
) -> None:
    """With no subscriber bound, the alternate exchange keeps the event (no return, no loss)."""
    event = task_event()
    await publisher.publish_event(event)
    unrouted = await admin_channel.get_queue(declared.unrouted)
    message = await next_message(unrouted)
    assert message.message_id == event.event_id


async def test_unroutable_request_raises(publisher: EventPublisher) -> None:
    """A mandatory publish nothing is bound for raises instead of vanishing."""
    with pytest.raises(Unroutable, match="nothing is bound"):
        await publisher.publish_request("no-such-key", b"{}")


async def test_publish_request_reaches_work_queue(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology
) -> None:
    """An expanded request lands on the work queue, persistent, with its headers and ids."""
    await publisher.publish_request(
        "transform", b'{"a": 1}', headers={"x-batch-id": "album-7"}, message_id="album-7-0"
    )
    message = await next_message(await admin_channel.get_queue(declared.transform))
    assert (message.body, message.message_id) == (b'{"a": 1}', "album-7-0")
    assert (message.delivery_mode, message.headers["x-batch-id"]) == (2, "album-7")


async def test_dead_letter_keeps_message_and_adds_reason(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology
) -> None:
    """dead_letter republishes body and properties to the dead queue with the error headers."""
    requests = await admin_channel.get_exchange(declared.requests)
    original = Message(b"not json", correlation_id="c-1", headers={"h": "v"}, reply_to="r")
    await requests.publish(original, "transform")
    received = await next_message(await admin_channel.get_queue(declared.transform))
    await publisher.dead_letter(received, ErrorCode.INVALID_REQUEST, "body is not JSON")
    dead = await next_message(await admin_channel.get_queue(declared.dead))
    assert (dead.body, dead.correlation_id, dead.reply_to) == (b"not json", "c-1", "r")
    assert dead.headers["h"] == "v"
    assert dead.headers["x-error-code"] == "invalid_request"
    assert dead.headers["x-error-message"] == "body is not JSON"
    assert dead.headers["x-original-routing-key"] == "transform"
    assert dead.delivery_mode == DeliveryMode.PERSISTENT


async def _discard(message: AbstractIncomingMessage) -> None:
    """A consumer callback that drops what it gets."""


@pytest.fixture
async def requester(amqp_url: str) -> AsyncIterator[tuple[AbstractChannel, AbstractQueue]]:
    """An app backend's channel consuming Direct Reply-to (on its own connection)."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        yield channel, await channel.get_queue(DIRECT_REPLY_TO, ensure=False)


async def test_reply_via_direct_reply_to(
    publisher: EventPublisher,
    admin_channel: AbstractChannel,
    declared: Topology,
    requester: tuple[AbstractChannel, AbstractQueue],
) -> None:
    """A terminal event reaches a requester waiting on amq.rabbitmq.reply-to, correlated."""
    channel, replies = requester
    received: asyncio.Queue[AbstractIncomingMessage] = asyncio.Queue()

    async def on_reply(message: AbstractIncomingMessage) -> None:
        await received.put(message)

    await replies.consume(on_reply, no_ack=True)  # must precede the request
    requests = await channel.get_exchange(declared.requests, ensure=False)
    request = Message(b"{}", reply_to=DIRECT_REPLY_TO, correlation_id="req-1")
    await requests.publish(request, "transform")
    job = await next_message(await admin_channel.get_queue(declared.transform))
    assert job.reply_to is not None
    assert job.reply_to.startswith(f"{DIRECT_REPLY_TO}.")
    event = task_event(EventKind.CANCELLED, TaskStatus.CANCELLED)
    await publisher.publish_reply(job.reply_to, job.correlation_id, event)
    async with asyncio.timeout(RECEIVE_TIMEOUT_S):
        reply = await received.get()
    assert reply.correlation_id == "req-1"
    assert TaskEvent.model_validate_json(reply.body) == event


async def test_reply_to_vanished_queue_is_dropped(
    publisher: EventPublisher, caplog: pytest.LogCaptureFixture
) -> None:
    """A reply whose requester has gone away is logged and dropped, not retried forever."""
    await publisher.publish_reply(f"gone-{uuid.uuid4().hex}", "c", task_event())
    assert "no longer exists" in caplog.text


async def test_reply_to_vanished_direct_reply_to_is_dropped(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology, amqp_url: str
) -> None:
    """A Direct Reply-to requester that disconnected does not break the publish channel."""
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        replies = await channel.get_queue(DIRECT_REPLY_TO, ensure=False)
        await replies.consume(_discard, no_ack=True)
        requests = await channel.get_exchange(declared.requests, ensure=False)
        await requests.publish(Message(b"{}", reply_to=DIRECT_REPLY_TO), "transform")
    job = await next_message(await admin_channel.get_queue(declared.transform))
    assert job.reply_to is not None
    await publisher.publish_reply(job.reply_to, None, task_event())
    await publisher.publish_request("transform", b"still works")


async def test_reply_to_own_queue_is_refused(
    publisher: EventPublisher, admin_channel: AbstractChannel, declared: Topology
) -> None:
    """A reply_to naming our work queue is refused: a request cannot loop events into it."""
    await publisher.publish_reply(declared.transform, "c", task_event())
    await publisher.publish_request("transform", b"marker")
    message = await next_message(await admin_channel.get_queue(declared.transform))
    assert message.body == b"marker"
