"""Fakes at the broker edge, for tests of the settle point, intake and dispatcher without one.

`FakeMessage` behaves like aio-pika's IncomingMessage where it matters: a second ack, nack or
reject raises, and a message whose channel is gone raises on every one. `FakePublisher`
records what would have been published and can be told to fail.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from consumer.errors import BrokerUnavailable


class AlreadySettled(Exception):
    """A delivery was acked, nacked or rejected twice (aio-pika's MessageProcessError)."""


class ChannelGone(Exception):
    """The delivery's channel is closed (aio-pika's ChannelInvalidStateError)."""


@dataclass
class FakeMessage:
    """An incoming delivery; `settlements` lists how it was ended ("ack", "nack", ...)."""

    body: bytes = b"{}"
    routing_key: str = "transform"
    headers: dict[str, Any] = field(default_factory=dict)
    message_id: str | None = None
    reply_to: str | None = None
    correlation_id: str | None = None
    content_type: str | None = "application/json"
    content_encoding: str | None = None
    app_id: str | None = None
    consumer_tag: str | None = "ctag"
    exchange: str | None = "style.requests"
    priority: int | None = None
    timestamp: Any = None
    type: str | None = None
    redelivered: bool = False
    channel_gone: bool = False
    settlements: list[str] = field(default_factory=list)
    settled: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def processed(self) -> bool:
        return bool(self.settlements)

    async def ack(self, multiple: bool = False) -> None:
        self._end("ack+multiple" if multiple else "ack")

    async def reject(self, requeue: bool = False) -> None:
        self._end("reject+requeue" if requeue else "reject")

    async def nack(self, multiple: bool = False, requeue: bool = True) -> None:
        self._end(("nack+multiple" if multiple else "nack") + ("+requeue" if requeue else ""))

    def _end(self, how: str) -> None:
        if self.channel_gone:
            raise ChannelGone(how)
        if self.settlements:
            raise AlreadySettled(f"{how} after {self.settlements}")
        self.settlements.append(how)
        self.settled.set()


@dataclass
class Published:
    kind: str  # "event", "reply", "dead_letter", "request"
    routing_key: str
    body: Any
    headers: dict[str, Any] = field(default_factory=dict)


class FakePublisher:
    """Records publishes. `fail_with` raises on every publish of the kinds in `failing`;
    `hold` (an Event) makes publishes wait until it is set."""

    def __init__(self) -> None:
        self.published: list[Published] = []
        self.fail_with: Exception | None = None
        self.failing: set[str] = {"event", "reply", "dead_letter", "request"}
        self.hold: asyncio.Event | None = None

    async def _record(self, item: Published) -> None:
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_with is not None and item.kind in self.failing:
            raise self.fail_with
        self.published.append(item)

    def of_kind(self, kind: str) -> list[Published]:
        return [p for p in self.published if p.kind == kind]

    def events(self, name: str | None = None) -> list[Any]:
        return [p.body for p in self.of_kind("event") if name is None or p.body.event == name]

    async def publish_event(self, event: Any) -> None:
        event.model_dump_json()  # what the real publisher encodes: it must not fail
        await self._record(Published("event", f"{event.event}.{event.user_id}", event))

    async def publish_reply(self, reply_to: str, correlation_id: str | None, event: Any) -> None:
        await self._record(Published("reply", reply_to, event, {"correlation_id": correlation_id}))

    async def dead_letter(self, message: Any, code: Any, reason: str) -> None:
        reason.encode()  # header values are encoded as UTF-8: it must not fail
        headers = {"x-error-code": str(code), "x-error-message": reason}
        await self._record(Published("dead_letter", message.routing_key, message.body, headers))

    async def publish_request(self, routing_key: str, body: bytes, **props: Any) -> None:
        headers = dict(props.get("headers") or {})
        await self._record(Published("request", routing_key, body, headers))


def broker_down() -> BrokerUnavailable:
    return BrokerUnavailable(f"no confirm ({uuid.uuid4().hex[:6]})")
