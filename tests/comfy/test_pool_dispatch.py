"""InstancePool dispatch without the network: instances marked healthy by hand."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from consumer.comfy import Demand, InstancePool
from consumer.comfy.instance import breaker_delay_s
from consumer.errors import InstanceUnavailable, WorkflowInvalid
from consumer.settings import ComfyInstanceSettings

NODES = frozenset({"LoadImage", "SaveImage", "KSampler"})


def make_pool(*capacities: int, nodes: frozenset[str] = NODES) -> InstancePool:
    settings = [
        ComfyInstanceSettings(url=f"http://127.0.0.1:{9000 + i}", name=f"i{i}", max_concurrency=c)
        for i, c in enumerate(capacities)
    ]
    pool = InstancePool(settings)
    for instance in pool.instances:
        instance.healthy = True
        instance.node_classes = nodes
    return pool


async def until(predicate: Callable[[], bool]) -> None:
    """Yield to the loop until `predicate` holds (tasks advance one step per yield)."""
    async with asyncio.timeout(2):
        while not predicate():  # noqa: ASYNC110 - waits for other tasks' next step, no event exists
            await asyncio.sleep(0)


async def test_most_free_capacity_wins() -> None:
    """The instance with the most free slots gets the next prompt."""
    pool = make_pool(1, 3)
    async with pool.slot() as first, pool.slot() as second:
        assert (first.name, second.name) == ("i1", "i1")
        async with pool.slot() as third:
            assert third.name in {"i0", "i1"}  # 1 free each: a tie


async def test_tie_goes_to_the_instance_idle_longest() -> None:
    """With equal free capacity, the one released longest ago is chosen."""
    pool = make_pool(1, 1)
    async with pool.slot() as used:
        pass
    async with pool.slot() as chosen:
        assert chosen is not used


async def test_waiters_are_served_first_come_first_served() -> None:
    """When all slots are taken, waiters acquire in arrival order."""
    pool = make_pool(1)
    order: list[int] = []
    gate = asyncio.Event()

    async def job(index: int) -> None:
        async with pool.slot():
            order.append(index)
            await gate.wait()

    group_started: list[int] = []
    async with asyncio.TaskGroup() as group:
        for index in range(5):
            group_started.append(index)
            group.create_task(job(index))
            await until(lambda: len(pool._waiters) + len(order) == len(group_started))
        gate.set()
    assert order == [0, 1, 2, 3, 4]


async def test_capacity_is_never_exceeded() -> None:
    """Many concurrent holders never push any instance past its capacity."""
    pool = make_pool(2, 3)
    peak: dict[str, int] = {}

    async def job() -> None:
        async with pool.slot() as instance:
            peak[instance.name] = max(peak.get(instance.name, 0), instance.in_flight)
            await asyncio.sleep(0)

    async with asyncio.TaskGroup() as group:
        for _ in range(40):
            group.create_task(job())
    assert peak == {"i0": 2, "i1": 3}
    assert all(i.in_flight == 0 for i in pool.instances)


async def test_slot_is_released_on_error_cancel_and_timeout() -> None:
    """Errors, cancellation of holders and of waiters all give the slot back."""
    pool = make_pool(1)
    with pytest.raises(RuntimeError):
        async with pool.slot():
            raise RuntimeError("boom")
    holder = asyncio.create_task(hold(pool))
    await until(lambda: pool.instances[0].in_flight == 1)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05), pool.slot():
            pass  # never reached: the one slot is held
    holder.cancel()
    with pytest.raises(asyncio.CancelledError):
        await holder
    assert pool.instances[0].in_flight == 0
    assert not pool._waiters


async def hold(pool: InstancePool) -> None:
    async with pool.slot():
        await asyncio.Event().wait()


async def test_instance_unavailable_takes_the_instance_out() -> None:
    """Leaving a slot with InstanceUnavailable marks the instance unhealthy at once."""
    pool = make_pool(1, 1)
    with pytest.raises(InstanceUnavailable):
        async with pool.slot() as instance:
            raise InstanceUnavailable("gone")
    assert not instance.healthy
    assert pool.healthy_capacity() == 1


async def test_exclude_avoids_the_failed_instance_when_another_exists() -> None:
    """A retry with exclude lands elsewhere; with no alternative it still gets a slot."""
    pool = make_pool(4, 1)
    async with pool.slot(exclude={"i0"}) as instance:
        assert instance.name == "i1"
    single = make_pool(1)
    async with single.slot(exclude={"i0"}) as instance:
        assert instance.name == "i0"


async def test_missing_node_classes_are_never_dispatched() -> None:
    """An instance without a required class is skipped even when it is the freest."""
    pool = make_pool(4, 1)
    pool.instances[0].node_classes = frozenset({"LoadImage"})
    async with pool.slot(Demand(frozenset({"KSampler"}))) as instance:
        assert instance.name == "i1"


async def test_requirement_no_instance_meets_is_workflow_invalid() -> None:
    """When every instance's classes are known and none has them all: WorkflowInvalid."""
    pool = make_pool(1, 1)
    with pytest.raises(WorkflowInvalid, match="i0 lacks NoSuchNode"):
        async with pool.slot(Demand(frozenset({"NoSuchNode", "KSampler"}))):
            pass


async def test_unknown_node_classes_make_callers_wait() -> None:
    """An instance never probed might have the class: the caller waits instead of failing."""
    pool = make_pool(1, 1)
    pool.instances[1].node_classes = None
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05), pool.slot(Demand(frozenset({"NoSuchNode"}))):
            pass


async def test_unhealthy_instances_get_nothing_and_capacity_reports_it() -> None:
    """Unhealthy instances are skipped; healthy_capacity and capacity_changed follow."""
    pool = make_pool(2, 3)
    changed = asyncio.create_task(pool.capacity_changed())
    await asyncio.sleep(0)  # let it start waiting
    pool._take_out(pool.instances[1], "test")
    async with asyncio.timeout(1):
        await changed
    assert pool.healthy_capacity() == 2
    async with pool.slot() as instance:
        assert instance.name == "i0"


def test_breaker_backoff_doubles_up_to_the_cap() -> None:
    """Probe delays double per failure and stop at breaker_max_backoff_s."""
    delays = [breaker_delay_s(n, 1.0, 10.0) for n in range(6)]
    assert delays == [1.0, 1.0, 2.0, 4.0, 8.0, 10.0]


def test_stats_expose_load_and_timings() -> None:
    """stats() reports in-flight, capacity, health and mean execution time per instance."""
    pool = make_pool(2)
    pool.instances[0].record_execution(1.0)
    pool.instances[0].record_execution(3.0)
    (stats,) = pool.stats()
    assert (stats.name, stats.capacity, stats.in_flight, stats.healthy) == ("i0", 2, 0, True)
    assert stats.mean_execute_s == 2.0
    assert "busy=0/2" in repr(pool)
