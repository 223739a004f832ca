"""Priorities and fairness through a real replica: interactive overtakes bulk, users' batches
interleave, and bulk work stays in the queue instead of being hoarded.

One emulated instance with one slot, and sampler steps slow enough (20 steps per task) that
the order of completions shows the scheduling, not the machine's speed.
"""

from __future__ import annotations

import asyncio

import pytest

from consumer.settings import ComfyInstanceSettings, SchedulerPolicy
from tests.e2e.harness import WAIT_S, EventLog, publish, request, running_service

pytestmark = [pytest.mark.connected, pytest.mark.slow]
STEP_S = 0.01  # 20 steps: 0.2 s per task on the instance
WINDOW = 2


@pytest.fixture
def one_slot(make_settings, emulators):
    """Settings for a replica on one instance with one slot."""
    for emulator in emulators:
        emulator.faults.step_seconds = STEP_S

    def build(**overrides):
        values = {
            "comfyui_instances": [
                ComfyInstanceSettings(url=emulators[0].url, name="gpu", max_concurrency=1)
            ],
            "scheduler_window": WINDOW,
        }
        return make_settings(**(values | overrides))

    return build


def completions(events: EventLog) -> list[dict]:
    return [e for e in events.events if e["event"] == "completed"]


def batch(photo_url: str, batch_id: str, user_id: str, size: int) -> dict:
    return {
        "batch_id": batch_id,
        "user_id": user_id,
        "image_urls": [photo_url] * size,
        "style_type": "clay",
    }


async def batch_tasks_ahead_of_a_single(settings, channel, topology, events, photos):
    """Publish a 10-photo batch, then (once it runs) a single: the batch tasks that ended first."""
    photo = photos.url("photos/photo.jpg")
    async with running_service(settings):
        await publish(channel, topology, "transform.batch", batch(photo, "b", "user_a", 10))
        await events.wait_for(lambda e: e["event"] == "started")
        single = request(photo, user_id="user_b")
        await publish(channel, topology, "transform", single)
        await events.terminal(single["task_id"])
        return [e["task_id"] for e in completions(events) if e["task_id"].startswith("b-")]


async def test_interactive_overtakes_a_batch(one_slot, channel, topology, events, photos):
    """A single published behind a 10-photo batch finishes right after the task running
    when it arrived: at most the running one and one staged before it, never the batch."""
    ahead = await batch_tasks_ahead_of_a_single(one_slot(), channel, topology, events, photos)
    assert len(ahead) <= 2, ahead


async def test_a_staged_bulk_prompt_gives_its_place(
    one_slot, channel, topology, emulators, events, photos
):
    """With two slots on the instance (one running, one staged), a single published behind
    a batch takes the staged bulk prompt's place: it is withdrawn and runs later."""
    photo = photos.url("photos/photo.jpg")
    two_slots = [ComfyInstanceSettings(url=emulators[0].url, name="gpu", max_concurrency=2)]
    async with running_service(one_slot(comfyui_instances=two_slots)) as running:
        await publish(channel, topology, "transform.batch", batch(photo, "b", "user_a", 6))
        await events.wait_for(lambda e: e["event"] == "started")
        single = request(photo, user_id="user_b")
        await publish(channel, topology, "transform", single)
        await events.terminal(single["task_id"])
        await events.wait_for(lambda e: e["event"] == "batch.completed")
        preempted = running.service.metrics.preemptions._value.get()
    assert preempted >= 1
    assert all(e["event"] == "completed" for e in completions(events))
    assert len(completions(events)) == 7


async def test_fifo_keeps_the_single_behind_the_batch(one_slot, channel, topology, events, photos):
    """The baseline the scheduler is measured against: with SCHEDULER=fifo the same single
    waits behind most of the batch (so the test above can fail)."""
    settings = one_slot(scheduler=SchedulerPolicy.FIFO)
    ahead = await batch_tasks_ahead_of_a_single(settings, channel, topology, events, photos)
    assert len(ahead) >= 5


async def test_two_users_batches_interleave(one_slot, channel, topology, events, photos):
    """Two users' batches published one after the other progress together: each has tasks
    among the first half of the completions."""
    photo = photos.url("photos/photo.jpg")
    async with running_service(one_slot(scheduler_batch_slice=2)):
        await publish(channel, topology, "transform.batch", batch(photo, "ba", "user_a", 8))
        await publish(channel, topology, "transform.batch", batch(photo, "bb", "user_b", 8))
        for batch_id in ("ba", "bb"):
            await events.wait_for(
                lambda e, b=batch_id: e["event"] == "batch.completed" and e["batch_id"] == b
            )
    first_half = [e["user_id"] for e in completions(events)[:8]]
    assert 2 <= first_half.count("user_b") <= 6, first_half


async def test_a_bulk_request_is_moved_to_the_bulk_queue(
    one_slot, channel, topology, events, photos
):
    """`"priority": "bulk"` on routing key `transform` runs as bulk work."""
    async with running_service(one_slot()) as running:
        body = request(photos.url("photos/photo.jpg"), priority="bulk")
        await publish(channel, topology, "transform", body)
        assert (await events.terminal(body["task_id"]))["event"] == "completed"
        waits = running.service.metrics.queue_wait_seconds
        assert _count(waits, "bulk") == 1
        assert _count(waits, "interactive") == 0


def _count(histogram, priority: str) -> float:
    (metric,) = histogram.collect()
    return sum(
        s.value
        for s in metric.samples
        if s.name.endswith("_count") and s.labels.get("priority") == priority
    )


async def test_bulk_work_is_not_hoarded(one_slot, channel, topology, events, photos):
    """While 12 bulk tasks wait, the replica holds at most its slot plus the window; the
    rest stays ready in the queue for other replicas."""
    photo = photos.url("photos/photo.jpg")
    total = 12
    async with running_service(one_slot()) as running:
        for _ in range(total):
            await publish(channel, topology, "transform.bulk", request(photo))
        feed = running.service._intake._bulk  # what this replica took from the queue
        held: list[int] = []
        async with asyncio.timeout(WAIT_S):
            while len(completions(events)) < total:
                ended = len(completions(events))
                held.append(feed.taken - ended)
                await events.wait_for(lambda _, n=ended: len(completions(events)) > n)
        queue = await channel.declare_queue(topology.bulk, passive=True)
    assert max(held) <= 1 + WINDOW, held
    assert feed.taken == total
    assert queue.declaration_result.message_count == 0
