"""The broker topology: names derived from one prefix, declared in code and shipped as JSON.

One description (`ExchangeSpec`/`QueueSpec`/`BindingSpec` lists built from a `Topology`)
feeds both `declare_topology()` and `definitions()`, so the objects the service declares and
`deploy/rabbitmq/definitions.json` cannot drift apart (a test compares them).

Every argument the behaviour depends on is explicit (queue type, delivery limit,
dead-letter exchange, lengths, TTL), so RabbitMQ 3.10 and 4.x behave the same. Only
arguments 3.10 accepts are used.

    requests (direct) --transform, transform.batch--> transform (quorum, DLX dlx, limit 5)
             \\--transform.bulk, transform.batch.bulk--> transform.bulk (same arguments)
             \\--cancel--> control (fanout) --> <prefix>.control.<random> (exclusive, per replica)
    events (topic, alternate-exchange unrouted) --> subscribers' queues
    unrouted (fanout) --> unrouted (quorum, max 10000 messages, 24 h TTL)
    dlx (fanout) --> dead (quorum)
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from aio_pika import ExchangeType
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue

INTERACTIVE_KEY = "transform"  # a single task, interactive unless its priority says bulk
TRANSFORM_KEYS = (INTERACTIVE_KEY, "transform.batch")
BULK_KEY = "transform.bulk"  # a bulk task (batch tasks, or a request with priority bulk)
BULK_BATCH_KEY = "transform.batch.bulk"  # a batch still to feed, from its `x-batch-offset`
BULK_KEYS = (BULK_KEY, BULK_BATCH_KEY)
CANCEL_KEY = "cancel"
DEFAULT_DELIVERY_LIMIT = 5
UNROUTED_MAX_LENGTH = 10_000
UNROUTED_TTL_MS = 24 * 60 * 60 * 1000
VHOST = "/"

Arguments = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ExchangeSpec:
    name: str
    type: ExchangeType
    arguments: Arguments = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class QueueSpec:
    name: str
    arguments: Arguments


@dataclass(frozen=True, slots=True)
class BindingSpec:
    source: str
    destination: str
    destination_type: Literal["queue", "exchange"]
    routing_key: str = ""


@dataclass(frozen=True, slots=True)
class Topology:
    """Every exchange and queue name of the service, derived from `AMQP_PREFIX`."""

    prefix: str = "style"

    @property
    def requests(self) -> str:
        return f"{self.prefix}.requests"

    @property
    def transform(self) -> str:
        return f"{self.prefix}.transform"

    @property
    def bulk(self) -> str:
        return f"{self.prefix}.transform.bulk"

    @property
    def control(self) -> str:
        return f"{self.prefix}.control"

    @property
    def events(self) -> str:
        return f"{self.prefix}.events"

    @property
    def unrouted(self) -> str:
        return f"{self.prefix}.unrouted"

    @property
    def dlx(self) -> str:
        return f"{self.prefix}.dlx"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.dead"

    def exchanges(self) -> list[ExchangeSpec]:
        """The durable exchanges, in an order where every referenced exchange comes first."""
        return [
            ExchangeSpec(self.dlx, ExchangeType.FANOUT),
            ExchangeSpec(self.unrouted, ExchangeType.FANOUT),
            ExchangeSpec(self.events, ExchangeType.TOPIC, {"alternate-exchange": self.unrouted}),
            ExchangeSpec(self.requests, ExchangeType.DIRECT),
            ExchangeSpec(self.control, ExchangeType.FANOUT),
        ]

    def queues(self, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> list[QueueSpec]:
        """The durable quorum queues, with every behaviour-defining argument explicit."""
        return [
            QueueSpec(self.transform, self._transform_arguments(delivery_limit)),
            QueueSpec(self.bulk, self._transform_arguments(delivery_limit)),
            QueueSpec(
                self.unrouted,
                {
                    "x-queue-type": "quorum",
                    "x-max-length": UNROUTED_MAX_LENGTH,
                    "x-message-ttl": UNROUTED_TTL_MS,
                },
            ),
            QueueSpec(self.dead, {"x-queue-type": "quorum"}),
        ]

    def _transform_arguments(self, delivery_limit: int) -> Arguments:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": delivery_limit,
            "x-dead-letter-exchange": self.dlx,
            # Dead letters are confirmed by the target queue (3.10+); needs reject-publish.
            "x-dead-letter-strategy": "at-least-once",
            "x-overflow": "reject-publish",
        }

    def bindings(self) -> list[BindingSpec]:
        work = [BindingSpec(self.requests, self.transform, "queue", key) for key in TRANSFORM_KEYS]
        bulk = [BindingSpec(self.requests, self.bulk, "queue", key) for key in BULK_KEYS]
        return [
            *work,
            *bulk,
            BindingSpec(self.requests, self.control, "exchange", CANCEL_KEY),
            BindingSpec(self.unrouted, self.unrouted, "queue"),
            BindingSpec(self.dlx, self.dead, "queue"),
        ]


@dataclass(frozen=True, slots=True)
class DeclaredTopology:
    """The declared objects, for consuming and publishing (robust: redeclared on reconnect)."""

    exchanges: dict[str, AbstractExchange]
    queues: dict[str, AbstractQueue]


async def declare_topology(
    channel: AbstractChannel,
    topology: Topology,
    delivery_limit: int = DEFAULT_DELIVERY_LIMIT,
) -> DeclaredTopology:
    """Declare every exchange, queue and binding; idempotent with identical arguments."""
    exchanges = {
        spec.name: await channel.declare_exchange(
            spec.name, spec.type, durable=True, arguments=spec.arguments
        )
        for spec in topology.exchanges()
    }
    queues = {
        spec.name: await channel.declare_queue(spec.name, durable=True, arguments=spec.arguments)
        for spec in topology.queues(delivery_limit)
    }
    for binding in topology.bindings():
        source = exchanges[binding.source]
        if binding.destination_type == "queue":
            await queues[binding.destination].bind(source, binding.routing_key)
        else:
            await exchanges[binding.destination].bind(source, binding.routing_key)
    return DeclaredTopology(exchanges, queues)


async def declare_control_queue(channel: AbstractChannel, topology: Topology) -> AbstractQueue:
    """This replica's exclusive, auto-delete classic queue bound to the control fanout.

    The name is generated here, not by the server: a robust channel redeclares its queues
    by name after a reconnect, and a client may not declare a server-style `amq.` name.
    """
    control = await channel.declare_exchange(topology.control, ExchangeType.FANOUT, durable=True)
    queue = await channel.declare_queue(
        f"{topology.control}.{uuid.uuid4().hex[:16]}",
        exclusive=True,
        auto_delete=True,
        arguments={"x-queue-type": "classic"},
    )
    await queue.bind(control)
    return queue


def definitions(topology: Topology, delivery_limit: int = DEFAULT_DELIVERY_LIMIT) -> dict[str, Any]:
    """The topology as a `rabbitmqctl import_definitions` document for vhost "/"."""
    return {
        "vhosts": [{"name": VHOST}],
        "exchanges": [_exchange_definition(spec) for spec in topology.exchanges()],
        "queues": [_queue_definition(spec) for spec in topology.queues(delivery_limit)],
        "bindings": [_binding_definition(spec) for spec in topology.bindings()],
    }


def _exchange_definition(spec: ExchangeSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "vhost": VHOST,
        "type": spec.type.value,
        "durable": True,
        "auto_delete": False,
        "internal": False,
        "arguments": spec.arguments,
    }


def _queue_definition(spec: QueueSpec) -> dict[str, Any]:
    return {
        "name": spec.name,
        "vhost": VHOST,
        "durable": True,
        "auto_delete": False,
        "arguments": spec.arguments,
    }


def _binding_definition(spec: BindingSpec) -> dict[str, Any]:
    return {
        "source": spec.source,
        "vhost": VHOST,
        "destination": spec.destination,
        "destination_type": spec.destination_type,
        "routing_key": spec.routing_key,
        "arguments": {},
    }
