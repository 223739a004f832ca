"""`Turns`: the pool's dispatch policy: who is served next, on which instance, and when a
waiting task asks a staged bulk prompt for its place. The pool owns the slots and the
waiters; this decides (`SCHEDULER=fair`, or `fifo`: arrival order, most free slots).

    for waiter in turns.in_turn(waiters):
        choice = turns.pick(waiter, waiters, instances, now)  # Instance | retry-at | None
"""

from __future__ import annotations

import asyncio
import functools
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from consumer.comfy.instance import Instance
from consumer.comfy.preemption import StagedPrompts
from consumer.comfy.scheduling import Demand, LoadEstimates, Priority
from consumer.settings import SchedulerPolicy

MAX_OWNERS_REMEMBERED = 1024  # owners whose last bulk grant is kept for taking turns


@dataclass(eq=False, slots=True)
class Waiter:
    """A task waiting for a slot of the pool."""

    demand: Demand
    exclude: frozenset[str]
    future: asyncio.Future[Instance]
    since: float  # loop time it began to wait
    asked: bool = False  # it asked a staged bulk prompt for its place (consumer.comfy.preemption)

    @property
    def waiting(self) -> bool:
        return not self.future.done()


class Turns:
    """The dispatch policy, with what it remembers: bulk slots per owner, load estimates."""

    def __init__(self, policy: SchedulerPolicy, load_estimates: LoadEstimates) -> None:
        self.policy = policy
        self.load_estimates = load_estimates
        self.staged = StagedPrompts()
        self._bulk_held: Counter[str] = Counter()  # bulk slots held, by owner
        self._bulk_served: dict[str, float] = {}  # owner -> loop time of its last bulk grant

    def __repr__(self) -> str:
        return f"<Turns {self.policy.value} bulk_held={dict(self._bulk_held)}>"

    def in_turn(self, waiters: Sequence[Waiter]) -> Iterator[Waiter]:
        """Waiters in the order they are served: all of them by arrival (fifo); else
        interactive ones by arrival, then bulk ones: the owner holding fewest slots first,
        then the one served longest ago (re-read after every grant, so owners alternate)."""
        if self.policy is SchedulerPolicy.FIFO:
            yield from waiters
            return
        bulk = []
        for waiter in waiters:
            if waiter.demand.priority is Priority.INTERACTIVE:
                yield waiter
            else:
                bulk.append(waiter)
        while bulk:
            turn = min(bulk, key=self._bulk_turn)  # min() is stable: ties go by arrival
            bulk.remove(turn)
            yield turn

    def pick(
        self, waiter: Waiter, waiters: Sequence[Waiter], instances: Iterable[Instance], now: float
    ) -> Instance | float | None:
        """The instance to grant `waiter` now; else the loop time to look again at (it waits
        for an instance holding its models); else None (no free slot suits it)."""
        demand = waiter.demand
        capable = [i for i in instances if i.serving and i.can_run(demand.required_nodes)]
        preferred = [i for i in capable if i.name not in waiter.exclude] or capable
        free = [i for i in preferred if i.free > 0]
        if not free:
            return None
        if self.policy is SchedulerPolicy.FIFO or not demand.models:
            return max(free, key=lambda i: (i.free, -i.last_released_at))
        warm = [i for i in free if i.memory.holds(demand.models)]
        if warm:
            return max(warm, key=lambda i: (i.free, -i.last_released_at))
        choice = min(
            free,
            key=lambda i: (
                _wanted(i.memory.loaded, waiter, waiters),
                self.load_estimates.cost_s(i.memory, demand.models),
                -i.free,
                i.last_released_at,
            ),
        )
        # Busy instances hold its models: wait for one, at most one estimated load (so no task
        # waits longer for affinity), and only if their slots can take it (`_absorbed`).
        patience_ends = waiter.since + self.load_estimates.cost_s(choice.memory, demand.models)
        evicts = bool(choice.memory.loaded)
        if (
            not waiter.asked
            and now < patience_ends
            and _absorbed(waiter, waiters, preferred, evicts)
        ):
            return patience_ends
        return choice

    def granted(self, waiter: Waiter, instance: Instance) -> None:
        """`instance` takes `waiter`'s prompt: one slot, and its models after its queue."""
        instance.in_flight += 1
        instance.memory.queued(waiter.demand.models)
        if waiter.demand.priority is Priority.BULK:
            owner = waiter.demand.owner
            self._bulk_held[owner] += 1
            self._bulk_served[owner] = asyncio.get_running_loop().time()

    def released(self, demand: Demand, waiters: Iterable[Waiter]) -> None:
        if demand.priority is not Priority.BULK:
            return
        self._bulk_held[demand.owner] -= 1
        if self._bulk_held[demand.owner] <= 0:
            del self._bulk_held[demand.owner]
        if len(self._bulk_served) > MAX_OWNERS_REMEMBERED:  # keep owners with work here
            active = set(self._bulk_held) | {w.demand.owner for w in waiters}
            self._bulk_served = {o: t for o, t in self._bulk_served.items() if o in active}

    def ask_for_places(self, waiters: Iterable[Waiter]) -> None:
        """Each interactive task left waiting asks one staged bulk prompt for its place (one
        holding its models first); the slot that prompt releases is then the task's."""
        if self.policy is SchedulerPolicy.FIFO:
            return
        for waiter in waiters:
            demand = waiter.demand
            if not waiter.waiting or waiter.asked or demand.priority is not Priority.INTERACTIVE:
                continue
            waiter.asked = self.staged.ask_one(
                suits=functools.partial(_may_run, waiter),
                prefer=functools.partial(_holds, demand.models),
            )
            if not waiter.asked:
                return

    def _bulk_turn(self, waiter: Waiter) -> tuple[int, float]:
        owner = waiter.demand.owner
        return self._bulk_held[owner], self._bulk_served.get(owner, -math.inf)


def _absorbed(
    waiter: Waiter, waiters: Sequence[Waiter], instances: list[Instance], evicts: bool
) -> bool:
    """Whether the slots of the instances holding the waiter's models outnumber the earlier
    waiters for the same models, so one frees a slot for it soon. Slots of an instance still
    loading them count only when the alternative evicts models: a load on an empty instance
    (start-up) is no worse than waiting for that load to end."""
    models = waiter.demand.models
    slots = sum(
        i.capacity for i in instances if i.memory.holds(models) and (evicts or not i.memory.loading)
    )
    ahead = 0
    for other in waiters:
        if other is waiter:
            break
        ahead += other.waiting and other.demand.models == models
    return ahead < slots


def _wanted(models: frozenset[str], besides: Waiter, waiters: Iterable[Waiter]) -> int:
    """How many other waiters would run without a load on an instance holding `models`."""
    return sum(1 for w in waiters if w is not besides and w.waiting and w.demand.models <= models)


def _may_run(waiter: Waiter, instance: Instance) -> bool:
    """Whether `instance` could serve `waiter` (serving, its node classes, not excluded)."""
    return (
        instance.serving
        and instance.can_run(waiter.demand.required_nodes)
        and instance.name not in waiter.exclude
    )


def _holds(models: frozenset[str], instance: Instance) -> bool:
    return instance.memory.holds(models)
