"""The topology: derived names, the shipped definitions file, declaration on a real broker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aio_pika import Message
from aio_pika.abc import AbstractChannel, AbstractQueue

from consumer.topology import Topology, declare_control_queue, declare_topology, definitions
from tests.broker.ctl import export_definitions, import_definitions, wait_until

DEFINITIONS_FILE = Path(__file__).parents[2] / "deploy" / "rabbitmq" / "definitions.json"
RECEIVE_TIMEOUT_S = 5.0
IMPORT_TIMEOUT_S = 20.0


def _comparable(defs: dict[str, Any]) -> dict[str, list[tuple[Any, ...]]]:
    """Exchanges, queues and bindings in a form both the file and an export share."""
    return {
        "exchanges": sorted(
            (e["name"], e["type"], e["durable"], e["auto_delete"], json.dumps(e["arguments"]))
            for e in defs["exchanges"]
        ),
        "queues": sorted(
            (q["name"], q["durable"], q["auto_delete"], json.dumps(q["arguments"], sort_keys=True))
            for q in defs["queues"]
        ),
        "bindings": sorted(
            (b["source"], b["destination"], b["destination_type"], b["routing_key"])
            for b in defs["bindings"]
        ),
    }


def test_names_derive_from_prefix() -> None:
    """Every name is `<prefix>.<role>`."""
    topology = Topology("acme")
    assert (topology.requests, topology.transform, topology.control) == (
        "acme.requests",
        "acme.transform",
        "acme.control",
    )
    assert (topology.events, topology.unrouted, topology.dlx, topology.dead) == (
        "acme.events",
        "acme.unrouted",
        "acme.dlx",
        "acme.dead",
    )


def test_definitions_file_is_the_code_topology() -> None:
    """deploy/rabbitmq/definitions.json is exactly what the code declares for prefix `style`."""
    shipped = json.loads(DEFINITIONS_FILE.read_text())
    assert shipped == definitions(Topology())


def test_work_queue_arguments_are_explicit() -> None:
    """The work queue sets type, delivery limit and DLX itself, never relying on 4.x defaults."""
    (transform,) = [q for q in Topology("p").queues(delivery_limit=7) if q.name == "p.transform"]
    assert transform.arguments["x-queue-type"] == "quorum"
    assert transform.arguments["x-delivery-limit"] == 7
    assert transform.arguments["x-dead-letter-exchange"] == "p.dlx"


@pytest.mark.connected
async def test_declare_twice_matches_definitions(
    admin_channel: AbstractChannel, topology: Topology
) -> None:
    """Declaring twice succeeds and leaves exactly the objects the definitions describe."""
    await declare_topology(admin_channel, topology)
    await declare_topology(admin_channel, topology)
    on_broker = await export_definitions(topology.prefix)
    assert _comparable(on_broker) == _comparable(definitions(topology))


@pytest.mark.connected
async def test_code_declares_over_imported_file(
    admin_channel: AbstractChannel, topology: Topology
) -> None:
    """Objects imported from the shipped file accept the code's declaration (no 406)."""
    text = DEFINITIONS_FILE.read_text().replace('"style.', f'"{topology.prefix}.')
    await import_definitions(text)
    expected = _comparable(definitions(topology))

    async def imported() -> bool:
        return _comparable(await export_definitions(topology.prefix)) == expected

    await wait_until(imported, IMPORT_TIMEOUT_S)  # the broker imports asynchronously
    await declare_topology(admin_channel, topology)
    assert _comparable(await export_definitions(topology.prefix)) == expected


async def _next_body(queue: AbstractQueue) -> bytes:
    async with asyncio.timeout(RECEIVE_TIMEOUT_S), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            return message.body
    raise AssertionError("queue iterator ended")


@pytest.mark.connected
async def test_requests_route_to_work_queue_and_every_control_queue(
    admin_channel: AbstractChannel, declared: Topology
) -> None:
    """transform keys reach the work queue; `cancel` reaches every replica's control queue."""
    replicas = [await declare_control_queue(admin_channel, declared) for _ in range(2)]
    requests = await admin_channel.get_exchange(declared.requests)
    work = await admin_channel.get_queue(declared.transform)
    for key in ("transform", "transform.batch"):
        await requests.publish(Message(key.encode()), key, mandatory=True)
        assert await _next_body(work) == key.encode()
    await requests.publish(Message(b"stop"), "cancel", mandatory=True)
    assert [await _next_body(queue) for queue in replicas] == [b"stop", b"stop"]


@pytest.mark.connected
async def test_control_queue_is_exclusive_and_auto_delete(
    admin_channel: AbstractChannel, declared: Topology
) -> None:
    """A replica's control queue belongs to its connection and disappears with it."""
    queue = await declare_control_queue(admin_channel, declared)
    assert queue.name.startswith(f"{declared.control}.")
    assert (queue.exclusive, queue.auto_delete, queue.durable) == (True, True, False)


@pytest.mark.connected
async def test_delivery_limit_dead_letters_to_dead_queue(
    admin_channel: AbstractChannel, topology: Topology
) -> None:
    """Past the delivery limit a request lands in the dead queue with x-death delivery_limit."""
    await declare_topology(admin_channel, topology, delivery_limit=1)
    requests = await admin_channel.get_exchange(topology.requests)
    await requests.publish(Message(b"poison"), "transform", mandatory=True)
    work = await admin_channel.get_queue(topology.transform)
    async with asyncio.timeout(RECEIVE_TIMEOUT_S), work.iterator() as messages:
        async for message in messages:
            await message.reject(requeue=True)  # counted on every version
            if message.headers.get("x-delivery-count") == 1:
                break
    dead = await admin_channel.get_queue(topology.dead)
    async with asyncio.timeout(RECEIVE_TIMEOUT_S), dead.iterator() as messages:
        async for message in messages:
            await message.ack()
            break
    deaths = message.headers["x-death"]
    assert isinstance(deaths, list)
    assert isinstance(deaths[0], dict)
    assert (message.body, deaths[0]["reason"], deaths[0]["queue"]) == (
        b"poison",
        "delivery_limit",
        topology.transform,
    )
