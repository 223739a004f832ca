"""Bulk work is pulled, one message at a time, only into room that this replica has.

Interactive requests are pushed to the replica (a consumer whose prefetch follows the
pool's capacity) and served first by the pool. Bulk messages are taken with `basic.get`
while `room()` is positive: the healthy capacity (capped by MAX_CONCURRENT_TASKS) plus
SCHEDULER_WINDOW, minus every task in hand. So a replica holds at most SCHEDULER_WINDOW
bulk tasks beyond what it can run, the rest stays in the queue for other replicas, and a
push consumer's fixed window never has to be re-negotiated as interactive work comes and
goes. The price is one round trip per bulk task (milliseconds, against seconds of GPU
time) and, on an empty queue, a poll every SCHEDULER_BULK_POLL_S; bulk work this replica
publishes itself wakes it at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

    from consumer.broker import Broker

log = logging.getLogger(__name__)
RETRY_S = 1.0
GET_TIMEOUT_S = 10.0


class BulkFeed:
    """Pulls the bulk queue into the room `room()` reports, until `stop()`."""

    def __init__(
        self,
        *,
        broker: Broker,
        queue_name: str,
        room: Callable[[], int],
        changes: Callable[[], list[asyncio.Event]],
        handle: Callable[[AbstractIncomingMessage], Coroutine[Any, Any, None]],
        poll_s: float,
    ) -> None:
        """`changes()` returns the events (taken before `room()` is read) whose setting may
        make room; `handle` decides and settles one message (it never raises)."""
        self._broker = broker
        self._queue_name = queue_name
        self._room = room
        self._changes = changes
        self._handle = handle
        self._poll_s = poll_s
        self._nudge = asyncio.Event()
        self._stopping = asyncio.Event()
        self._handling: set[asyncio.Task[None]] = set()
        self.taken = 0

    def __repr__(self) -> str:
        return f"<BulkFeed {self._queue_name} handling={len(self._handling)} taken={self.taken}>"

    def nudge(self) -> None:
        """Bulk work was just published: look now rather than at the next poll."""
        self._nudge.set()

    def stop(self) -> None:
        """Take no more messages; those taken are still handled (and settled)."""
        self._stopping.set()

    async def run(self) -> None:
        queue: AbstractQueue | None = None
        while not self._stopping.is_set():
            events = [*self._changes(), self._stopping]
            if self._room() - len(self._handling) <= 0:
                await first_set(events)
                continue
            try:
                if queue is None:
                    queue = await self._open()
                message = await queue.get(no_ack=False, fail=False, timeout=GET_TIMEOUT_S)
            except Exception as exc:  # the channel is reconnecting or gone: try again shortly
                log.warning("could not take bulk work: %s; retrying", exc)
                queue = None
                await first_set([self._stopping], timeout_s=RETRY_S)
                continue
            if message is None:  # empty: wait for room to matter again, a nudge, or the poll
                self._nudge.clear()
                await first_set([self._nudge, self._stopping], timeout_s=self._poll_s)
                continue
            self._start(message)

    def _start(self, message: AbstractIncomingMessage) -> None:
        self.taken += 1
        task = asyncio.create_task(self._handle(message), name="bulk message")
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _open(self) -> AbstractQueue:
        channel = await self._broker.consume_connection.channel()
        return await channel.get_queue(self._queue_name, ensure=True)

    async def wait_handled(self) -> None:
        """Return once every message taken so far was handed over or settled."""
        while self._handling:
            await asyncio.wait(set(self._handling))


async def first_set(events: list[asyncio.Event], timeout_s: float | None = None) -> None:
    """Return when any of `events` is set, or after `timeout_s`."""
    waiters = [asyncio.create_task(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()
