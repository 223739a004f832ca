"""Broker: two named robust connections, readiness, recovery, and a blocked publisher."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from aio_pika.abc import AbstractRobustConnection

from consumer.broker import Broker
from consumer.errors import BrokerUnavailable
from consumer.events import EventPublisher
from consumer.topology import Topology
from contracts import EventKind, TaskEvent, TaskStatus
from tests.broker.ctl import (
    close_connection,
    connection_pids,
    ctl,
    memory_alarm_on,
    memory_watermark,
    set_memory_watermark,
    wait_until,
)

pytestmark = pytest.mark.connected

RECONNECT_TIMEOUT_S = 10.0
ALARM_TIMEOUT_S = 10.0


def accepted_event() -> TaskEvent:
    """A valid `accepted` event with a fresh event_id."""
    now = datetime.now(UTC)
    return TaskEvent(
        event=EventKind.ACCEPTED,
        event_id=uuid.uuid4().hex,
        task_id="t-1",
        user_id="u-1",
        status=TaskStatus.PENDING,
        progress=0,
        attempt=1,
        created_at=now,
        timestamp=now,
    )


async def test_connections_are_named_with_heartbeat(broker: Broker) -> None:
    """Consume and publish are two connections, named for targeted kills, heartbeat negotiated."""
    assert broker.is_connected
    out = await ctl("list_connections", "timeout", "client_properties", "--no-table-headers", "-q")
    for role in ("consume", "publish"):
        needle = f'{{"connection_name","{broker.connection_name(role)}"}}'
        (line,) = [line for line in out.splitlines() if needle in line]
        assert line.startswith("10\t")


async def test_not_connected_after_exit(amqp_url: str) -> None:
    """is_connected is False once the Broker is closed (and before it is opened)."""
    broker = Broker(amqp_url, heartbeat_s=10, name=f"test-exit-{uuid.uuid4().hex}")
    states = [broker.is_connected]
    async with broker:
        states.append(broker.is_connected)
    states.append(broker.is_connected)
    assert states == [False, True, False]


async def _killed_and_reconnected(connection: AbstractRobustConnection, name: str) -> None:
    reconnected = asyncio.Event()
    connection.reconnect_callbacks.add(lambda *_: reconnected.set())
    await close_connection(name)
    async with asyncio.timeout(RECONNECT_TIMEOUT_S):
        await reconnected.wait()


async def test_publish_connection_recovers_after_kill(broker: Broker, declared: Topology) -> None:
    """Killing the publish connection leaves consume alone; publishing works after recovery."""
    consume_pids = await connection_pids(broker.connection_name("consume"))
    publish_name = broker.connection_name("publish")
    await _killed_and_reconnected(broker.publish_connection, publish_name)
    publisher = EventPublisher(broker.publish_channel, declared, publish_timeout_s=5.0)
    await publisher.publish_event(accepted_event())
    assert await connection_pids(broker.connection_name("consume")) == consume_pids
    assert broker.is_connected


@pytest.mark.slow
async def test_memory_alarm_times_out_publish(broker: Broker, declared: Topology) -> None:
    """A blocked broker makes publish raise BrokerUnavailable in time, then recovers."""
    publisher = EventPublisher(broker.publish_channel, declared, publish_timeout_s=1.0)
    previous = await memory_watermark()
    try:
        await set_memory_watermark("0")
        await wait_until(memory_alarm_on, ALARM_TIMEOUT_S)
        with pytest.raises(BrokerUnavailable, match="no confirm within"):
            await publisher.publish_event(accepted_event())
    finally:
        await set_memory_watermark(*previous)
    recovered = EventPublisher(broker.publish_channel, declared, publish_timeout_s=10.0)
    await recovered.publish_event(accepted_event())


async def test_unreachable_broker_fails_fast_without_password() -> None:
    """Start-up against a closed port raises BrokerUnavailable naming the URL, not the password."""
    broker = Broker("amqp://guest:s3cret@127.0.0.1:1/", name="test-unreachable")
    with pytest.raises(BrokerUnavailable, match=r"test-unreachable\.consume") as caught:
        await broker.__aenter__()
    assert "s3cret" not in str(caught.value)
