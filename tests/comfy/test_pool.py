"""InstancePool with several emulators: health, circuit breaker, failover."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from consumer.comfy import Demand, InstancePool
from consumer.errors import InstanceUnavailable, WorkflowInvalid
from consumer.settings import ComfyInstanceSettings
from consumer.testing.comfyui_emulator import ComfyEmulator
from consumer.testing.emulator_nodes import NodeRegistry
from tests.comfy.helpers import fast_pool, invert_prompt, png_bytes

pytestmark = pytest.mark.emulator_only


@contextlib.asynccontextmanager
async def running_pool(
    tmp_path: Path, count: int, capacity: int = 2, lacking: frozenset[str] = frozenset()
) -> AsyncIterator[tuple[InstancePool, list[ComfyEmulator]]]:
    """`count` emulators named a, b, ...; the first one lacks the `lacking` node classes."""
    async with contextlib.AsyncExitStack() as stack:
        emulators = [ComfyEmulator(output_dir=tmp_path / f"e{i}") for i in range(count)]
        registry = emulators[0].registry
        kept = [registry.get(name) for name in registry.names() if name not in lacking]
        emulators[0].registry = NodeRegistry([node for node in kept if node is not None])
        for emulator in emulators:
            await stack.enter_async_context(emulator)
        settings = [
            ComfyInstanceSettings(url=emu.url, name=chr(ord("a") + i), max_concurrency=capacity)
            for i, emu in enumerate(emulators)
        ]
        pool = fast_pool(settings)
        await stack.enter_async_context(pool)  # as app.Service does: open, then run()
        task = asyncio.create_task(pool.run())
        try:
            await capacity_reaches(pool, lambda c: c == count * capacity)
            yield pool, emulators
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def capacity_reaches(pool: InstancePool, predicate: Callable[[int], bool]) -> None:
    async with asyncio.timeout(5):
        while not predicate(pool.healthy_capacity()):
            await pool.capacity_changed()


async def test_all_instances_become_healthy_with_node_classes(tmp_path: Path) -> None:
    """After start every instance is probed healthy and its node classes are known."""
    async with running_pool(tmp_path, 2) as (pool, _):
        assert all(s.healthy and s.websocket_connected for s in pool.stats())
        assert all("SaveImage" in (i.node_classes or ()) for i in pool.instances)


async def test_dead_instance_is_taken_out_and_put_back(tmp_path: Path) -> None:
    """A dying instance leaves the healthy capacity; it returns once it answers again."""
    async with running_pool(tmp_path, 2) as (pool, emulators):
        await emulators[0].die()
        await capacity_reaches(pool, lambda c: c == 2)
        assert pool.instances[0].consecutive_failures >= 1
        await emulators[0].restart()
        await capacity_reaches(pool, lambda c: c == 4)


async def test_failover_when_an_instance_dies_mid_prompt(tmp_path: Path) -> None:
    """Instance a dies while running our prompt: InstanceUnavailable; the retry runs on b."""
    async with running_pool(tmp_path, 2) as (pool, emulators):
        emulators[0].faults.hang = True

        async def die_mid_prompt() -> None:
            async with pool.slot(exclude={"b"}) as instance:
                assert instance.name == "a"
                image = await instance.client.upload_image(png_bytes(), "fo.png")
                run = await instance.client.submit(invert_prompt(image))
                await run.wait_started()
                await emulators[0].die()
                await run.wait()

        with pytest.raises(InstanceUnavailable):
            await die_mid_prompt()
        assert not pool.instances[0].healthy
        async with pool.slot(exclude={"a"}) as instance:
            assert instance.name == "b"
            image = await instance.client.upload_image(png_bytes(), "fo.png")
            outputs = await (await instance.client.submit(invert_prompt(image))).wait()
        assert len(outputs) == 1


async def test_prompts_spread_over_instances_within_capacity(tmp_path: Path) -> None:
    """Eight prompts through two instances of capacity 2: all succeed, none over capacity."""
    async with running_pool(tmp_path, 2) as (pool, _):
        peak = 0

        async def job(index: int) -> int:
            nonlocal peak
            async with pool.slot(Demand(frozenset({"LoadImage", "SaveImage"}))) as instance:
                peak = max(peak, instance.in_flight)
                client = instance.client
                image = await client.upload_image(png_bytes(), f"spread-{index}.png")
                return len(await (await client.submit(invert_prompt(image))).wait())

        async with asyncio.timeout(20):
            counts = await asyncio.gather(*(job(i) for i in range(8)))
    assert counts == [1] * 8
    assert peak <= 2


async def test_node_class_no_instance_has_is_workflow_invalid(tmp_path: Path) -> None:
    """Once every instance was probed, an unknown required class raises WorkflowInvalid."""
    async with running_pool(tmp_path, 2) as (pool, _):
        with pytest.raises(WorkflowInvalid, match="a lacks NoSuchNode; b lacks NoSuchNode"):
            async with pool.slot(Demand(frozenset({"NoSuchNode"}))):
                pass


async def test_instance_lacking_a_node_class_never_gets_the_prompt(tmp_path: Path) -> None:
    """a lacks KSampler: however free a is, KSampler workflows all go to b."""
    async with running_pool(tmp_path, 2, capacity=4, lacking=frozenset({"KSampler"})) as (
        pool,
        _,
    ):
        needs = frozenset({"KSampler"})
        async with pool.slot(Demand(needs)) as first, pool.slot(Demand(needs)) as second:
            assert (first.name, second.name) == ("b", "b")
        async with pool.slot(Demand(frozenset({"LoadImage"}))) as any_instance:
            assert any_instance.name in {"a", "b"}


async def test_run_alone_opens_and_closes_the_clients(emulator: ComfyEmulator) -> None:
    """Without `async with pool`, run() opens the clients itself and marks all down at the end."""
    pool = fast_pool([ComfyInstanceSettings(url=emulator.url, name="solo")])
    task = asyncio.create_task(pool.run())
    await capacity_reaches(pool, lambda c: c == 2)
    assert pool.instances[0].client.connected
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert pool.healthy_capacity() == 0
    assert not pool.instances[0].client.connected
