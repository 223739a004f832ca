"""Two robust AMQP connections: one consumes, one publishes.

A memory or disk alarm blocks every *publishing* connection; keeping consumption on its
own connection means acks still flow while publishes wait (RabbitMQ's own advice).
Each connection carries a name (`<name>.consume`, `<name>.publish`) so operators and
tests can find and close it (`rabbitmqctl close_connection`).
"""

from __future__ import annotations

from contextlib import AsyncExitStack
from types import TracebackType
from typing import Self, TypeVar

import aio_pika
import aiormq
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractRobustConnection
from yarl import URL

from consumer.errors import BrokerUnavailable

DEFAULT_HEARTBEAT_S = 15
DEFAULT_RECONNECT_INTERVAL_S = 5.0
_T = TypeVar("_T")


class Broker:
    """Owns the consume and publish connections and the confirmed publish channel.

    Use as `async with Broker(url, heartbeat_s=15, name="style-consumer-1") as broker:`.
    Reconnection is aio-pika's: channels, QoS, declarations and consumers are restored;
    unconfirmed publishes are not (callers see an error and do not ack).
    """

    def __init__(
        self,
        amqp_url: str,
        heartbeat_s: int = DEFAULT_HEARTBEAT_S,
        name: str = "style-consumer",
        reconnect_interval_s: float = DEFAULT_RECONNECT_INTERVAL_S,
    ) -> None:
        self._amqp_url = amqp_url
        self._heartbeat_s = heartbeat_s
        self._reconnect_interval_s = reconnect_interval_s
        self.name = name
        self._stack = AsyncExitStack()
        self._consume: AbstractRobustConnection | None = None
        self._publish: AbstractRobustConnection | None = None
        self._publish_channel: AbstractChannel | None = None

    def __repr__(self) -> str:
        return f"<Broker {self.name!r} connected={self.is_connected}>"

    async def __aenter__(self) -> Self:
        async with AsyncExitStack() as stack:
            self._consume = await stack.enter_async_context(await self._connect("consume"))
            self._publish = await stack.enter_async_context(await self._connect("publish"))
            channel = await self._publish.channel(publisher_confirms=True, on_return_raises=True)
            stack.push_async_callback(channel.close)
            self._publish_channel = channel
            self._stack = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._stack.aclose()

    async def _connect(self, role: str) -> AbstractRobustConnection:
        """Connect once (fail fast at start-up); aio-pika reconnects after that."""
        name = self.connection_name(role)
        try:
            return await aio_pika.connect_robust(
                self._amqp_url,
                heartbeat=self._heartbeat_s,
                reconnect_interval=self._reconnect_interval_s,
                client_properties={"connection_name": name},
            )
        except (ConnectionError, aiormq.exceptions.AMQPError) as exc:
            url = URL(self._amqp_url).with_password(None)
            raise BrokerUnavailable(
                f"cannot open AMQP connection {name!r} to {url}: {exc}"
            ) from exc

    def connection_name(self, role: str) -> str:
        """The `connection_name` the broker shows for the `consume` or `publish` connection."""
        return f"{self.name}.{role}"

    @property
    def consume_connection(self) -> AbstractRobustConnection:
        return _opened(self._consume)

    @property
    def publish_connection(self) -> AbstractRobustConnection:
        return _opened(self._publish)

    @property
    def publish_channel(self) -> AbstractChannel:
        """A channel with publisher confirms whose unroutable mandatory publishes raise."""
        return _opened(self._publish_channel)

    async def consume_channel(self, prefetch_count: int) -> AbstractChannel:
        """A new channel on the consume connection with QoS set (restored on reconnect).

        Keep a reference: the robust connection only tracks channels weakly.
        """
        channel = await self.consume_connection.channel()
        await channel.set_qos(prefetch_count=prefetch_count)
        return channel

    @property
    def is_connected(self) -> bool:
        """Both connections and the publish channel are up now (readiness, not liveness)."""
        connections_up = all(
            conn is not None and not conn.is_closed and conn.connected.is_set()
            for conn in (self._consume, self._publish)
        )
        channel = self._publish_channel
        return connections_up and channel is not None and not channel.is_closed


def _opened(resource: _T | None) -> _T:
    if resource is None:
        raise RuntimeError("Broker is not open: use `async with Broker(...)`")
    return resource


def delivery_count(message: AbstractIncomingMessage) -> int:
    """How many times a quorum queue delivered `message` before (its x-delivery-count)."""
    value = (message.headers or {}).get("x-delivery-count", 0)
    return value if isinstance(value, int) else 0


def header_int(message: AbstractIncomingMessage, name: str) -> int | None:
    """Header `name` when it is an integer (never a bool); None when absent or anything else."""
    value = (message.headers or {}).get(name)
    return value if isinstance(value, int) and not isinstance(value, bool) else None
