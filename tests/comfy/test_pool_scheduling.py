"""The pool's scheduling: model affinity within a bounded wait, priorities, fair turns.

No network: instances are marked healthy by hand, and slots are held by tasks that wait
on events the test sets, so every assertion is about the order of grants.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from consumer.comfy import Demand, Instance, InstancePool, Priority
from consumer.comfy.scheduling import LoadEstimates, ModelLoad, ModelMemory
from consumer.settings import ComfyInstanceSettings, SchedulerPolicy
from tests.comfy.test_pool_dispatch import until

A, B, C = frozenset({"a.safetensors"}), frozenset({"b.safetensors"}), frozenset({"c.safetensors"})


def make_pool(
    *capacities: int,
    policy: SchedulerPolicy = SchedulerPolicy.FAIR,
    load_prior_s: float = 30.0,
) -> InstancePool:
    settings = [
        ComfyInstanceSettings(url=f"http://127.0.0.1:{9000 + i}", name=f"i{i}", max_concurrency=c)
        for i, c in enumerate(capacities)
    ]
    pool = InstancePool(settings, policy=policy, load_prior_s=load_prior_s)
    for instance in pool.instances:
        instance.healthy = True
        instance.node_classes = frozenset()
    return pool


class Holder:
    """A task holding one slot of the pool until `release()`."""

    def __init__(self, pool: InstancePool, demand: Demand) -> None:
        self.granted: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        self._done = asyncio.Event()
        self.served = False  # for tests that follow grants one by one
        self.task = asyncio.create_task(self._hold(pool, demand))

    async def _hold(self, pool: InstancePool, demand: Demand) -> None:
        async with pool.slot(demand) as instance:
            self.granted.set_result(instance)
            await self._done.wait()

    @property
    def instance(self) -> str | None:
        return self.granted.result().name if self.granted.done() else None

    def release(self) -> None:
        self._done.set()


@pytest.fixture
async def holders() -> AsyncIterator[list[Holder]]:
    made: list[Holder] = []
    yield made
    for holder in made:
        holder.task.cancel()
    for holder in made:
        with contextlib.suppress(asyncio.CancelledError):
            await holder.task


def hold(made: list[Holder], pool: InstancePool, demand: Demand) -> Holder:
    holder = Holder(pool, demand)
    made.append(holder)
    return holder


def bulk(models: frozenset[str] = A, owner: str = "u1") -> Demand:
    return Demand(models=models, priority=Priority.BULK, owner=owner)


async def granted(*waiting: Holder) -> None:
    async with asyncio.timeout(5):
        await asyncio.gather(*(h.granted for h in waiting))


async def test_a_free_instance_holding_the_models_is_preferred(holders) -> None:
    """Each task goes to the instance whose loaded models it uses, not the emptiest one."""
    pool = make_pool(1, 2)
    pool.instances[0].memory.queued(A)
    pool.instances[1].memory.queued(B)
    first = hold(holders, pool, Demand(models=A))
    await granted(first)
    assert first.instance == "i0"  # i1 has more free slots, but holds B


async def test_a_task_waits_for_its_models_rather_than_pay_a_load(holders) -> None:
    """With its models busy on another instance, a task leaves a free one alone and takes the
    busy one when it frees, within its patience (one estimated load)."""
    pool = make_pool(1, 1, load_prior_s=60.0)
    for instance, models in zip(pool.instances, (A, B), strict=True):
        instance.memory.queued(models)
        instance.memory.loading = False  # each has run a prompt with them
    running = hold(holders, pool, Demand(models=A))
    await granted(running)
    waiting = hold(holders, pool, Demand(models=A))
    await until(lambda: len(pool._waiters) == 1)
    assert waiting.instance is None  # i1 is free, but holds B
    running.release()
    await granted(waiting)
    assert waiting.instance == "i0"


async def test_tasks_beyond_the_warm_slots_pay_a_load_at_once(holders) -> None:
    """At start-up one instance holds a checkpoint every task wants: tasks queued behind as
    many others as it has slots take the free instances at once rather than wait."""
    pool = make_pool(1, 1, 1, load_prior_s=60.0)
    pool.instances[0].memory.queued(A)
    pool.instances[0].memory.loading = False
    running = hold(holders, pool, Demand(models=A))
    await granted(running)
    assert running.instance == "i0"
    first, second = hold(holders, pool, Demand(models=A)), hold(holders, pool, Demand(models=A))
    await granted(second)
    assert first.instance is None  # i0's one slot takes it next: it waits
    assert second.instance in {"i1", "i2"}


async def test_a_rare_style_is_served_within_one_estimated_load(holders) -> None:
    """The instance holding a rare model stays busy: after one estimated load time the task
    takes the free instance and pays the load; it is never starved."""
    pool = make_pool(1, 1, load_prior_s=0.2)
    pool.instances[1].memory.queued(A)
    busy = hold(holders, pool, Demand(models=C))
    await granted(busy)
    assert busy.instance == "i0"  # nobody holds C: the instance nobody wants
    pool.instances[0].memory.loading = False  # C is loaded there: worth a wait
    rare = hold(holders, pool, Demand(models=C))
    await granted(rare)  # i0 never frees: only the patience can grant it
    assert rare.instance == "i1"


async def test_a_rare_style_is_not_overtaken_by_later_common_work(holders) -> None:
    """When no instance holds a task's models, it takes the next free slot in its turn, even
    when later tasks would run there without a load."""
    pool = make_pool(1)
    pool.instances[0].memory.queued(A)
    first = hold(holders, pool, bulk(A))
    await granted(first)
    rare = hold(holders, pool, bulk(C))
    common = hold(holders, pool, bulk(A))
    await until(lambda: len(pool._waiters) == 2)
    first.release()
    await granted(rare)
    assert common.instance is None


async def test_interactive_overtakes_bulk(holders) -> None:
    """A freed slot goes to interactive work before bulk work that waited longer."""
    pool = make_pool(1)
    first = hold(holders, pool, bulk())
    await granted(first)
    queued = [hold(holders, pool, bulk()) for _ in range(3)]
    interactive = hold(holders, pool, Demand(models=A))
    await until(lambda: len(pool._waiters) == 4)
    first.release()
    await granted(interactive)
    assert all(h.instance is None for h in queued)


async def test_bulk_owners_take_turns(holders) -> None:
    """Two owners' bulk work alternates on one slot, although one owner's arrived first."""
    pool = make_pool(1)
    first = hold(holders, pool, bulk(owner="u1"))
    await granted(first)
    owners = ["u1", "u1", "u1", "u2", "u2"]
    waiting = [hold(holders, pool, bulk(owner=o)) for o in owners]
    await until(lambda: len(pool._waiters) == len(owners))
    order: list[str] = []
    current = first
    for _ in owners:
        current.release()
        await until(lambda: any(h.granted.done() and not h.served for h in waiting))
        current = next(h for h in waiting if h.granted.done() and not h.served)
        current.served = True
        order.append(owners[waiting.index(current)])
    assert order == ["u2", "u1", "u2", "u1", "u1"]


async def test_fifo_ignores_models_and_priority(holders) -> None:
    """The baseline policy: arrival order, most free slots, blind to models and classes."""
    pool = make_pool(1, 2, policy=SchedulerPolicy.FIFO)
    pool.instances[0].memory.queued(A)
    first = hold(holders, pool, Demand(models=A))
    await granted(first)
    assert first.instance == "i1"  # most free slots wins, although i0 holds A
    second = hold(holders, pool, Demand(models=A))
    await granted(second)
    third = hold(holders, pool, bulk())
    await granted(third)
    blocked_bulk = hold(holders, pool, bulk())
    blocked_interactive = hold(holders, pool, Demand())
    await until(lambda: len(pool._waiters) == 2)
    first.release()
    await granted(blocked_bulk)
    assert blocked_interactive.instance is None


def test_memory_counts_only_loads_the_socket_reported() -> None:
    """A loader listed in execution_cached was no load; one that ran is, cold then recent."""
    memory = ModelMemory()
    loaders = {"2": "a.safetensors"}
    assert memory.observe(loaders, cached={"2"}, seconds={}) == []
    first = memory.observe(loaders, cached=set(), seconds={"2": 4.0, "3": 1.0})
    again = memory.observe(loaders, cached=set(), seconds={"2": 1.5})
    assert first == [ModelLoad("a.safetensors", 4.0, recent=False)]
    assert again == [ModelLoad("a.safetensors", 1.5, recent=True)]


def test_load_estimates_learn_cold_and_recent_costs() -> None:
    """Estimates start at the prior and follow what loads took, separately when recent."""
    estimates = LoadEstimates(prior_s=10.0)
    memory = ModelMemory()
    assert estimates.cost_s(memory, A) == 10.0
    estimates.learn(ModelLoad("a.safetensors", 4.0, recent=False))
    assert estimates.cost_s(memory, A) == 4.0
    memory.seen.add("a.safetensors")
    assert estimates.cost_s(memory, A) == 4.0  # no recent load seen yet: the cold figure
    estimates.learn(ModelLoad("a.safetensors", 1.0, recent=True))
    assert estimates.cost_s(memory, A) == 1.0
    memory.queued(A)
    assert estimates.cost_s(memory, A) == 0.0


async def test_interactive_work_asks_a_staged_bulk_prompt_for_its_place(holders) -> None:
    """With every slot held by bulk work, an interactive task asks one staged bulk prompt to
    give its place back, and gets the slot it releases before the bulk work waiting."""
    pool = make_pool(2)
    running, staged = hold(holders, pool, bulk()), hold(holders, pool, bulk())
    await granted(running, staged)
    queued_bulk = hold(holders, pool, bulk())
    with pool.staged.holding(pool.instances[0]) as asked:
        await until(lambda: len(pool._waiters) == 1)
        assert not asked.is_set()  # bulk work never asks
        interactive = hold(holders, pool, Demand(models=A))
        async with asyncio.timeout(5):
            await asked.wait()
    staged.release()  # its task withdrew the prompt
    await granted(interactive)
    assert queued_bulk.instance is None


async def test_fifo_never_preempts(holders) -> None:
    """The baseline policy does not ask staged prompts for their place."""
    pool = make_pool(1, policy=SchedulerPolicy.FIFO)
    first = hold(holders, pool, bulk())
    await granted(first)
    with pool.staged.holding(pool.instances[0]) as asked:
        hold(holders, pool, Demand(models=A))
        await until(lambda: len(pool._waiters) == 1)
        assert not asked.is_set()


async def test_no_wait_for_an_instance_still_loading_the_models(holders) -> None:
    """An instance only handed the models (its first prompt with them still running) frees a
    slot no sooner than a load elsewhere: the task takes the free instance at once."""
    pool = make_pool(1, 1, load_prior_s=60.0)
    running = hold(holders, pool, Demand(models=A))
    await granted(running)
    assert pool.instances[0 if running.instance == "i0" else 1].memory.loading
    second = hold(holders, pool, Demand(models=A))
    await granted(second)
    assert second.instance != running.instance
