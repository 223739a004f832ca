"""Samples replicas in this process: free slots, tasks waiting for one, work held, the queues.

Read straight from each `Service`'s pool and dispatcher (private state: the sidecar's
/stats has no pool waiters), and the broker's ready counts by a passive queue.declare.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import asdict, dataclass
from typing import Any

from aio_pika.abc import AbstractChannel

from consumer.app import Service
from consumer.comfy import Priority
from consumer.topology import Topology

INTERVAL_S = 0.1


@dataclass(frozen=True)
class ReplicaSample:
    capacity: int  # slots of its healthy instances
    used: int  # slots held
    waiting: int  # tasks waiting in its pool for a slot
    in_hand: int  # tasks it holds (running, waiting, admitting)
    bulk_in_hand: int

    @property
    def free(self) -> int:
        return self.capacity - self.used

    @property
    def uncovered(self) -> int:
        """Free slots that no task in hand is about to take (conservatively: every task in
        hand without a slot counts as about to take one)."""
        return max(0, self.free - (self.in_hand - self.used))

    @property
    def stuck(self) -> int:
        """Waiting tasks its own free slots could not take."""
        return max(0, self.waiting - self.free)

    @property
    def idle_beside_waiters(self) -> int:
        """Free slots while tasks wait in its own pool (waiting for an instance that holds
        their models, say)."""
        return min(self.free, self.waiting)


@dataclass(frozen=True)
class Tick:
    at_s: float  # loop time
    replicas: tuple[ReplicaSample, ...]
    ready: int  # messages ready in the interactive and bulk queues


def sample(service: Service) -> ReplicaSample:
    pool, dispatcher = service._pool, service._dispatcher
    assert pool is not None
    assert dispatcher is not None
    jobs = [job for job, _ in dispatcher._running.values()]
    return ReplicaSample(
        capacity=pool.healthy_capacity(),
        used=sum(i.in_flight for i in pool.instances),
        waiting=sum(not w.future.done() for w in pool._waiters),
        in_hand=len(jobs) + len(dispatcher._admitting),
        bulk_in_hand=sum(job.priority is Priority.BULK for job in jobs),
    )


async def ready_messages(channel: AbstractChannel, topology: Topology) -> int:
    total = 0
    for name in (topology.transform, topology.bulk):
        queue = await channel.declare_queue(name, passive=True)
        total += queue.declaration_result.message_count or 0
    return total


async def sample_replicas(
    services: list[Service], channel: AbstractChannel, topology: Topology, stop: asyncio.Event
) -> dict[str, Any]:
    """Every INTERVAL_S until `stop`: a `Tick`; then `summary()` of them, and the ticks."""
    loop = asyncio.get_running_loop()
    ticks: list[Tick] = []
    while not stop.is_set():
        replicas = tuple(sample(s) for s in services)
        ticks.append(Tick(loop.time(), replicas, await ready_messages(channel, topology)))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(INTERVAL_S):
                await stop.wait()
    return {**summary(ticks), "ticks": [_tick_json(t, ticks[0].at_s) for t in ticks]}


def summary(ticks: list[Tick]) -> dict[str, Any]:
    """Seconds some replica had an uncovered free slot while another had a task stuck
    waiting (and slot-seconds so lost) or while the broker had ready messages; seconds a
    replica had free slots beside its own waiters; the most held beyond capacity."""
    totals = dict.fromkeys(("idle_while_other_waits_s", "lost_slot_s", "idle_while_queued_s",
                            "idle_beside_own_waiters_s"), 0.0)  # fmt: skip
    for tick, after in itertools.pairwise(ticks):
        dt_s = after.at_s - tick.at_s
        lost = [min(r.uncovered, _stuck_elsewhere(tick, i)) for i, r in enumerate(tick.replicas)]
        totals["idle_while_other_waits_s"] += dt_s if any(lost) else 0.0
        totals["lost_slot_s"] += dt_s * sum(lost)
        uncovered = any(r.uncovered for r in tick.replicas)
        totals["idle_while_queued_s"] += dt_s if tick.ready and uncovered else 0.0
        beside = any(r.idle_beside_waiters for r in tick.replicas)
        totals["idle_beside_own_waiters_s"] += dt_s if beside else 0.0
    samples = [r for t in ticks for r in t.replicas]
    return {
        **totals,
        "max_beyond_capacity": max([0, *(r.in_hand - r.capacity for r in samples)]),
        "max_bulk_beyond_capacity": max([0, *(r.bulk_in_hand - r.capacity for r in samples)]),
        "samples": len(ticks),
    }


def _stuck_elsewhere(tick: Tick, index: int) -> int:
    return sum(r.stuck for i, r in enumerate(tick.replicas) if i != index)


def _tick_json(tick: Tick, origin_s: float) -> dict[str, Any]:
    return {
        "t_s": round(tick.at_s - origin_s, 3),
        "ready": tick.ready,
        "replicas": [asdict(r) for r in tick.replicas],
    }
