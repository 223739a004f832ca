"""Fixtures for the AMQP plumbing tests: a unique topology, an admin channel, LIFO cleanup."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from consumer.broker import Broker
from consumer.events import EventPublisher
from consumer.topology import Topology, declare_topology


@pytest.fixture
def topology(prefix: str) -> Topology:
    """The names of a fresh topology, unique to this test."""
    return Topology(prefix)


@pytest.fixture
def extra_queues() -> list[str]:
    """Queues a test declares on its own; `admin_channel` deletes them afterwards."""
    return []


@pytest.fixture
async def admin_channel(
    amqp_url: str, topology: Topology, extra_queues: list[str]
) -> AsyncIterator[AbstractChannel]:
    """A plain channel for the test's own declarations; deletes the topology afterwards."""
    async with await aio_pika.connect(amqp_url) as connection:
        yield await connection.channel()
        cleanup = await connection.channel()  # the test may have closed the first one
        for name in reversed(extra_queues):
            await cleanup.queue_delete(name)
        for spec in topology.queues():
            await cleanup.queue_delete(spec.name)
        for exchange in topology.exchanges():
            await cleanup.exchange_delete(exchange.name)


@pytest.fixture
async def declared(admin_channel: AbstractChannel, topology: Topology) -> Topology:
    """The topology, declared on the real broker (deleted after the test)."""
    await declare_topology(admin_channel, topology)
    return topology


@pytest.fixture
async def broker(amqp_url: str, request: pytest.FixtureRequest) -> AsyncIterator[Broker]:
    """An open Broker whose connections are named after the test."""
    name = f"test-{request.node.name}"
    async with Broker(amqp_url, heartbeat_s=10, name=name, reconnect_interval_s=0.2) as opened:
        yield opened


@pytest.fixture
async def publisher(broker: Broker, declared: Topology) -> EventPublisher:
    """An EventPublisher on the broker's confirmed channel, over the declared topology."""
    return EventPublisher(broker.publish_channel, declared, publish_timeout_s=5.0)
