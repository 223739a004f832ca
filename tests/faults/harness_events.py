"""The independent event subscriber of the fault suite.

A durable quorum queue `<prefix>.faults.events`, bound to `<prefix>.events` with `#` before
any request is published, consumed over its own robust connection: it survives broker
restarts and forced closes, so every event the service confirmed reaches it. The queue is
deleted by the clean-up.

A message the broker redelivers to us (our ack was lost with the connection) carries
`redelivered` and an `event_id` already seen: it is not a duplicate published by the
service, so it is not counted. Everything else is.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from consumer.topology import Topology

TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass
class _Coverage:
    """A waiter for `needed` of `task_ids` to have a terminal event; `seen` counts them."""

    task_ids: set[str]
    needed: int
    seen: int
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def covered(self, task_id: str) -> None:
        if task_id in self.task_ids:
            self.seen += 1
            if self.seen >= self.needed:
                self.done.set()


class EventCollector:
    """Every event of one topology, indexed by task; waits for coverage of a set of tasks."""

    def __init__(self, topology: Topology) -> None:
        self.topology = topology
        self.queue_name = f"{topology.prefix}.faults.events"
        self.events: list[dict[str, Any]] = []
        self.terminal: dict[str, list[dict[str, Any]]] = defaultdict(list)
        self.kinds: Counter[str] = Counter()
        self.ignored_redeliveries = 0
        self._seen_ids: set[str] = set()
        self._watches: list[_Coverage] = []
        self._changed = asyncio.Condition()
        self._connection: AbstractRobustConnection | None = None

    def __repr__(self) -> str:
        return f"<EventCollector events={len(self.events)} terminal_tasks={len(self.terminal)}>"

    async def start(self, amqp_url: str) -> None:
        """Connect, bind the queue to every event, start consuming (before any publish)."""
        self._connection = await aio_pika.connect_robust(
            amqp_url, client_properties={"connection_name": f"{self.queue_name}.subscriber"}
        )
        channel = await self._connection.channel()
        await channel.set_qos(prefetch_count=500)
        exchange = await channel.get_exchange(self.topology.events)
        queue = await channel.declare_queue(
            self.queue_name, durable=True, arguments={"x-queue-type": "quorum"}
        )
        await queue.bind(exchange, "#")
        await queue.consume(self._on_message)

    async def close(self) -> None:
        if self._connection is not None:
            await self._connection.close()

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        event = orjson.loads(message.body)
        event_id = str(event.get("event_id"))
        async with self._changed:
            if message.redelivered and event_id in self._seen_ids:
                self.ignored_redeliveries += 1
            else:
                self._record(event, event_id)
            self._changed.notify_all()
        await message.ack()

    def _record(self, event: dict[str, Any], event_id: str) -> None:
        self._seen_ids.add(event_id)
        self.events.append(event)
        self.kinds[str(event.get("event"))] += 1
        task_id = event.get("task_id")
        if event.get("event") not in TERMINAL or not task_id:
            return
        if task_id not in self.terminal:
            for watch in self._watches:
                watch.covered(task_id)
        self.terminal[task_id].append(event)

    def terminal_count(self, task_ids: set[str] | None = None) -> int:
        """Tasks (of `task_ids`, or all) that have at least one terminal event."""
        if task_ids is None:
            return len(self.terminal)
        return sum(1 for task_id in task_ids if task_id in self.terminal)

    async def wait_terminal(self, task_ids: set[str], count: int, timeout_s: float) -> None:
        """Until at least `count` of `task_ids` have a terminal event (O(1) per event)."""
        watch = _Coverage(task_ids, count, self.terminal_count(task_ids))
        if watch.seen >= count:
            return
        self._watches.append(watch)
        try:
            async with asyncio.timeout(timeout_s):
                await watch.done.wait()
        finally:
            self._watches.remove(watch)

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float
    ) -> dict[str, Any]:
        """The first event matching `predicate`, waiting for it if needed (each event seen once)."""
        checked = 0
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for event in self.events[checked:]:
                    if predicate(event):
                        return event
                checked = len(self.events)
                await self._changed.wait()

    def duplicates(self, task_ids: set[str]) -> int:
        """Terminal events beyond the first, per task of `task_ids`."""
        return sum(max(0, len(self.terminal.get(t, ())) - 1) for t in task_ids)

    def distinct_duplicates(self, task_ids: set[str]) -> int:
        """Duplicates that carry a new `event_id` (a consumer deduplicating by id sees them)."""
        ids_per_task = ({e.get("event_id") for e in self.terminal.get(t, ())} for t in task_ids)
        return sum(max(0, len(ids) - 1) for ids in ids_per_task)

    def conflicting(self, task_ids: set[str]) -> dict[str, set[str]]:
        """Tasks whose terminal events disagree on the outcome (never allowed)."""
        outcomes = {t: {e["event"] for e in self.terminal.get(t, ())} for t in task_ids}
        return {t: kinds for t, kinds in outcomes.items() if len(kinds) > 1}
