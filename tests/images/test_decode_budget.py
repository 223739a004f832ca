"""DecodeBudget: waiting, refusal, arrival order, cancellation; and the pipeline's decode path."""

from __future__ import annotations

import asyncio
import threading

import pytest

from consumer.decode_budget import DecodeBudget
from consumer.errors import ImageTooLarge
from consumer.images import normalise, probe
from consumer.pipeline import PipelineConfig, normalise_within
from tests.images.test_normalise import encoded, photo, png_header_only

WAIT_S = 5.0


async def _nothing() -> None:
    pass


async def next_turn() -> None:
    """Return once every task already scheduled has taken its next step (the queue is FIFO)."""
    await asyncio.create_task(_nothing())


class Holder:
    """A task that reserves `nbytes`, says so, and keeps them until told to leave."""

    def __init__(self, budget: DecodeBudget, nbytes: int, name: str, entered: list[str]) -> None:
        self.name = name
        self.inside = asyncio.Event()
        self.leave = asyncio.Event()
        self.task = asyncio.create_task(self._hold(budget, nbytes, entered))

    async def _hold(self, budget: DecodeBudget, nbytes: int, entered: list[str]) -> None:
        async with budget.reserve(nbytes):
            entered.append(self.name)
            self.inside.set()
            await self.leave.wait()

    async def finish(self) -> None:
        self.leave.set()
        async with asyncio.timeout(WAIT_S):
            await self.task


async def test_reservations_that_fit_go_in_at_once():
    """Reservations within the capacity proceed together, and their bytes come back."""
    budget = DecodeBudget(100)
    entered: list[str] = []
    first, second = Holder(budget, 60, "a", entered), Holder(budget, 40, "b", entered)
    async with asyncio.timeout(WAIT_S):
        await first.inside.wait()
        await second.inside.wait()
    assert budget.in_use_bytes == 100
    await first.finish()
    await second.finish()
    assert budget.in_use_bytes == 0


async def test_a_reservation_waits_until_enough_bytes_are_free():
    """A request that does not fit waits, and goes in when the bytes it needs are released."""
    budget = DecodeBudget(100)
    entered: list[str] = []
    first = Holder(budget, 70, "first", entered)
    second = Holder(budget, 50, "second", entered)
    await next_turn()
    assert entered == ["first"]
    assert budget.waiting == 1
    await first.finish()
    async with asyncio.timeout(WAIT_S):
        await second.inside.wait()
    assert budget.in_use_bytes == 50
    await second.finish()


async def test_a_request_larger_than_the_budget_is_refused_at_once():
    """More bytes than the whole capacity could never be served: ImageTooLarge, no waiting."""
    budget = DecodeBudget(100)
    with pytest.raises(ImageTooLarge, match="IMAGE_DECODE_BUDGET_BYTES"):
        async with budget.reserve(101):
            pytest.fail("the body must not run")
    assert (budget.in_use_bytes, budget.waiting) == (0, 0)


async def test_a_large_waiter_is_not_starved_by_later_small_ones():
    """Waiters go in arrival order: a small request that would fit waits behind a large one."""
    budget = DecodeBudget(100)
    entered: list[str] = []
    running = Holder(budget, 60, "running", entered)
    large = Holder(budget, 80, "large", entered)
    small = Holder(budget, 30, "small", entered)
    await next_turn()
    assert entered == ["running"]  # 60 + 30 would fit, but "large" came first
    await running.finish()
    async with asyncio.timeout(WAIT_S):
        await large.inside.wait()
    await next_turn()
    assert entered == ["running", "large"]  # 80 + 30 does not fit
    await large.finish()
    await small.finish()
    assert entered == ["running", "large", "small"]


async def test_a_cancelled_waiter_leaves_the_queue_and_unblocks_the_next():
    """Cancelling the head of the queue lets the smaller requests behind it in."""
    budget = DecodeBudget(100)
    entered: list[str] = []
    running = Holder(budget, 60, "running", entered)
    large = Holder(budget, 80, "large", entered)
    small = Holder(budget, 30, "small", entered)
    await next_turn()
    large.task.cancel()
    async with asyncio.timeout(WAIT_S):
        await small.inside.wait()
    assert entered == ["running", "small"]
    assert large.task.cancelled()
    await running.finish()
    await small.finish()
    assert (budget.in_use_bytes, budget.waiting) == (0, 0)


async def test_bytes_granted_to_a_cancelled_waiter_are_given_back():
    """A waiter cancelled after its bytes were granted, before it ran, does not keep them."""
    budget = DecodeBudget(100)
    entered: list[str] = []
    async with budget.reserve(100):
        waiter = Holder(budget, 100, "waiter", entered)
        await next_turn()
        assert budget.waiting == 1
    assert budget.in_use_bytes == 100  # granted to the waiter, which has not run yet
    waiter.task.cancel()
    async with asyncio.timeout(WAIT_S):
        await asyncio.wait({waiter.task})
    assert entered == []
    assert (budget.in_use_bytes, budget.waiting) == (0, 0)


async def test_a_thread_keeps_its_bytes_until_it_ends_even_when_cancelled():
    """A worker thread cannot be stopped, so its reservation outlives the cancelled caller."""
    budget = DecodeBudget(100)
    started, release = asyncio.Event(), threading.Event()
    loop = asyncio.get_running_loop()

    def work() -> None:
        loop.call_soon_threadsafe(started.set)
        release.wait(WAIT_S)

    task = asyncio.create_task(budget.run_in_thread(70, work))
    async with asyncio.timeout(WAIT_S):
        await started.wait()
    task.cancel()
    await next_turn()
    assert budget.in_use_bytes == 70
    release.set()
    async with asyncio.timeout(WAIT_S):
        await asyncio.wait({task})
    assert task.cancelled()
    assert budget.in_use_bytes == 0


async def test_the_pipeline_path_normalises_a_photo_within_the_budget():
    """A normal JPEG goes through probe, budget and decode, and gives its bytes back."""
    budget = DecodeBudget(64 * 1024 * 1024)
    data = encoded(photo((4032, 3024)), "JPEG", quality=80)
    result = await normalise_within(budget, data, PipelineConfig())
    assert (result.width, result.height, result.source_format) == (1008, 752, "JPEG")
    assert result == normalise(data)
    assert (budget.in_use_bytes, budget.waiting) == (0, 0)


async def test_the_pipeline_path_refuses_a_decode_larger_than_the_budget():
    """An image whose decode would need more than the whole budget fails as ImageTooLarge."""
    data = encoded(photo((2000, 1500)), "PNG")
    assert probe(data).estimated_decode_bytes > 1_000_000
    with pytest.raises(ImageTooLarge, match="decode budget"):
        await normalise_within(DecodeBudget(1_000_000), data, PipelineConfig())


async def test_the_pipeline_path_refuses_a_huge_png_before_reserving():
    """A PNG over the full-decode limit is refused from its header; no bytes are reserved."""
    budget = DecodeBudget(1)
    config = PipelineConfig(max_pixels_full_decode=1_000_000)
    with pytest.raises(ImageTooLarge, match="over the limit of 1000000 for PNG"):
        await normalise_within(budget, png_header_only(2000, 1000), config)
    assert budget.in_use_bytes == 0


def test_budget_repr_shows_its_counters():
    """The repr names bytes in use, the capacity and the queue length, for logs."""
    assert repr(DecodeBudget(300_000_000)) == "<DecodeBudget in_use=0/300 MB waiting=0>"


def test_capacity_must_be_positive():
    """A budget of no bytes could serve nothing: a programming error."""
    with pytest.raises(ValueError, match="positive"):
        DecodeBudget(0)
