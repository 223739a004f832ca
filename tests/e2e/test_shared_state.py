"""With the Redis store: leases keep a task from running twice; earlier prompts are adopted."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from consumer.comfy import ComfyClient
from consumer.state import TaskRecord, task_key
from consumer.workflows import RenderParams, StyleCatalog
from contracts import TaskStatus
from tests.e2e.harness import jpeg_bytes, publish, request, running_service

pytestmark = pytest.mark.connected
WORKFLOWS = Path(__file__).resolve().parents[2] / "workflows"


@pytest.fixture
def redis_settings(make_settings, redis_url, redis_store):
    return make_settings(
        state_backend="redis",
        redis_url=redis_url,
        redis_key_prefix=redis_store._prefix,
        lease_ttl_s=1.0,
    )


def _record(task_id: str, **fields) -> TaskRecord:
    now = datetime.now(UTC)
    values = {
        "task_id": task_id,
        "user_id": "user_1",
        "style_type": "clay",
        "status": TaskStatus.PROCESSING,
        "created_at": now,
        "updated_at": now,
    }
    values.update(fields)
    return TaskRecord(**values)


async def test_a_task_leased_by_a_live_replica_waits_for_it(
    redis_settings, redis_store, channel, topology, events, photos
):
    """A delivery of a task another replica holds waits until that lease is released."""
    body = request(photos.url("photos/photo.jpg"))
    await redis_store.create(_record(body["task_id"]))
    assert await redis_store.acquire_lease(body["task_id"], "other-replica", 60)
    async with running_service(redis_settings):
        await publish(channel, topology, "transform", body)
        await events.wait_for(
            lambda e: e["task_id"] == body["task_id"] and e["event"] == "accepted"
        )
        assert "started" not in events.of(body["task_id"])
        await redis_store.release_lease(body["task_id"], "other-replica")
        done = await events.terminal(body["task_id"])
    assert done["event"] == "completed"


async def test_a_prompt_left_by_a_dead_replica_is_adopted(
    redis_settings, redis_store, channel, topology, events, photos, emulators
):
    """A task whose prompt already ran on an instance is completed from it, not run again."""
    task_id = f"t-{uuid.uuid4().hex[:8]}"
    style = StyleCatalog.load(WORKFLOWS).get("clay")
    async with ComfyClient(emulators[0].url) as client:
        ref = await client.upload_image(jpeg_bytes(64, 64), f"{task_id}.png")
        run = await client.submit(
            style.render(RenderParams(image=ref, seed=1, filename_prefix=task_id))
        )
        await run.wait()
    await redis_store.create(_record(task_id, instance="comfy-0", prompt_id=run.prompt_id, seed=1))
    executed = sum(e.prompts_executed for e in emulators)
    async with running_service(redis_settings):
        await publish(
            channel, topology, "transform", request(photos.url("photos/photo.jpg"), task_id=task_id)
        )
        done = await events.terminal(task_id)
    assert done["event"] == "completed", done
    assert done["instance"] == "comfy-0"
    assert sum(e.prompts_executed for e in emulators) == executed
    assert task_id in done["output_image_url"]


async def test_lookup_and_idempotency_survive_a_restart(
    redis_settings, channel, topology, events, photos, emulators
):
    """With Redis, a second replica life still knows the task: redelivery re-publishes, no rerun."""
    body = request(photos.url("photos/photo.jpg"))
    async with running_service(redis_settings):
        await publish(channel, topology, "transform", body)
        first = await events.terminal(body["task_id"])
    executed = sum(e.prompts_executed for e in emulators)
    async with running_service(redis_settings):
        await publish(channel, topology, "transform", body)
        again = await events.wait_for(
            lambda e: (
                e["task_id"] == body["task_id"] and e["event"] == "completed" and e is not first
            )
        )
    assert again["event_id"] == first["event_id"]
    assert sum(e.prompts_executed for e in emulators) == executed


async def test_a_task_whose_bookkeeping_fails_every_time_is_dead_lettered(
    redis_settings, redis_store, channel, topology, events, photos
):
    """A store error on every delivery requeues until the delivery limit dead-letters it."""
    body = request(photos.url("photos/photo.jpg"))
    key = task_key(body["user_id"], body["task_id"])
    await redis_store._redis.hset(f"{redis_store._prefix}lease:{key}", "x", "1")
    async with running_service(redis_settings):
        await publish(channel, topology, "transform", body)
        failed = await events.terminal(body["task_id"])
        dead_queue = await channel.get_queue(topology.dead)
        async with asyncio.timeout(30), dead_queue.iterator() as messages:
            async for message in messages:
                await message.ack()
                break
    assert failed["event"] == "failed"
    assert failed["error"]["code"] == "internal_error"
    assert message.headers["x-death"][0]["reason"] == "delivery_limit"
