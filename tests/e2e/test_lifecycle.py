"""Batches, cancels, retries, idempotent redelivery, reply_to and graceful shutdown."""

from __future__ import annotations

import asyncio

import aio_pika
import aiohttp
import orjson
import pytest

from consumer.settings import ComfyInstanceSettings
from tests.e2e.harness import WAIT_S, publish, request, running_service

pytestmark = pytest.mark.connected


async def test_batch_expands_into_tasks_and_reports_completion(
    settings, channel, topology, events, photos
):
    """A batch of three becomes tasks {batch_id}-0..2 and one batch.completed event."""
    body = {
        "batch_id": "b-1",
        "user_id": "user_1",
        "image_urls": [photos.url("photos/photo.jpg")] * 2 + [photos.url("photos/missing.jpg")],
        "style_type": "cartoon",
        "metadata": {"album": 3},
    }
    async with running_service(settings):
        await publish(channel, topology, "transform.batch", body)
        done = await events.wait_for(lambda e: e["event"] == "batch.completed")
        for index in range(3):
            ended = await events.terminal(f"b-1-{index}")
            assert ended["batch_id"] == "b-1"
            assert ended["batch_index"] == index
    assert done["task_ids"] == ["b-1-0", "b-1-1", "b-1-2"]
    assert (done["completed"], done["failed"], done["cancelled"]) == (2, 1, 0)
    assert done["metadata"] == {"album": 3}


async def test_redelivered_completed_task_is_not_run_again(
    settings, channel, topology, events, photos, emulators
):
    """The same task_id published again gets the stored terminal event, not a second execution."""
    body = request(photos.url("photos/photo.jpg"))
    async with running_service(settings):
        await publish(channel, topology, "transform", body)
        first = await events.terminal(body["task_id"])
        executed = sum(e.prompts_executed for e in emulators)
        await publish(channel, topology, "transform", body)
        second = await events.wait_for(
            lambda e: (
                e["task_id"] == body["task_id"] and e["event"] == "completed" and e is not first
            )
        )
    assert second["event_id"] == first["event_id"]
    assert second["output_image_url"] == first["output_image_url"]
    assert sum(e.prompts_executed for e in emulators) == executed


async def test_terminal_event_goes_to_reply_to_with_correlation_id(
    settings, channel, topology, events, photos
):
    """reply_to and correlation_id are honoured with Direct Reply-to."""
    replies: asyncio.Queue[aio_pika.abc.AbstractIncomingMessage] = asyncio.Queue()
    reply_queue = await channel.get_queue("amq.rabbitmq.reply-to", ensure=False)
    await reply_queue.consume(replies.put, no_ack=True)
    body = request(photos.url("photos/photo.jpg"))
    async with running_service(settings):
        await publish(
            channel,
            topology,
            "transform",
            body,
            reply_to="amq.rabbitmq.reply-to",
            correlation_id="corr-1",
        )
        async with asyncio.timeout(WAIT_S):
            reply = await replies.get()
    assert reply.correlation_id == "corr-1"
    assert orjson.loads(reply.body)["event"] == "completed"


async def test_retry_on_another_instance_when_one_dies_mid_prompt(
    make_settings, channel, topology, events, photos, emulators
):
    """An instance that dies mid-prompt costs one `retrying` event; the task completes elsewhere."""
    for emulator in emulators:
        emulator.faults.step_seconds = 0.05
    settings = make_settings()
    async with running_service(settings):
        body = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", body)
        started = await events.wait_for(
            lambda e: e["task_id"] == body["task_id"] and e["event"] == "progress"
        )
        victim = emulators[int(started["instance"].rsplit("-", 1)[1])]
        await victim.die()
        done = await events.terminal(body["task_id"])
    assert done["event"] == "completed", done
    assert done["attempt"] == 2
    assert done["instance"] != started["instance"]
    assert "retrying" in events.of(body["task_id"])


async def test_cancel_running_and_queued_tasks(
    make_settings, channel, topology, events, photos, emulators
):
    """Cancel reaches a running prompt (interrupted) and a task still waiting in the queue."""
    for emulator in emulators:
        emulator.faults.hang = True
    settings = make_settings(max_concurrent_tasks=1)
    running_task = request(photos.url("photos/photo.jpg"))
    queued_task = request(photos.url("photos/photo.jpg"))
    async with running_service(settings):
        await publish(channel, topology, "transform", running_task)
        await events.wait_for(
            lambda e: e["task_id"] == running_task["task_id"] and e["event"] == "started"
        )
        await publish(channel, topology, "transform", queued_task)
        cancel = {"user_id": "user_1", "task_id": queued_task["task_id"]}
        await publish(channel, topology, "cancel", cancel)
        await publish(
            channel,
            topology,
            "cancel",
            {"user_id": "someone_else", "task_id": running_task["task_id"]},
        )
        await publish(
            channel, topology, "cancel", {"user_id": "user_1", "task_id": running_task["task_id"]}
        )
        first = await events.terminal(running_task["task_id"])
        second = await events.terminal(queued_task["task_id"])
    assert first["event"] == "cancelled"
    assert first["error"]["code"] == "cancelled"
    assert second["event"] == "cancelled"
    assert "started" not in events.of(queued_task["task_id"])


async def test_graceful_shutdown_finishes_tasks_in_flight(
    make_settings, channel, topology, events, photos, emulators
):
    """On stop, a running task finishes within the grace period and its message is acked."""
    for emulator in emulators:
        emulator.faults.step_seconds = 0.02
    settings = make_settings(shutdown_grace_s=20)
    body = request(photos.url("photos/photo.jpg"))
    async with running_service(settings) as running:
        await publish(channel, topology, "transform", body)
        await events.wait_for(lambda e: e["task_id"] == body["task_id"] and e["event"] == "started")
        running.stop.set()
        await asyncio.wait_for(running.task, WAIT_S)
    assert (await events.terminal(body["task_id"]))["event"] == "completed"
    queue = await channel.declare_queue(topology.transform, passive=True)
    assert queue.declaration_result.message_count == 0


async def test_shutdown_past_grace_leaves_the_task_for_redelivery(
    make_settings, channel, topology, events, photos, emulators
):
    """A task still running when the grace period ends is interrupted and left unacked."""
    for emulator in emulators:
        emulator.faults.hang = True
    settings = make_settings(shutdown_grace_s=0.2)
    body = request(photos.url("photos/photo.jpg"))
    async with running_service(settings) as running:
        await publish(channel, topology, "transform", body)
        await events.wait_for(lambda e: e["task_id"] == body["task_id"] and e["event"] == "started")
        running.stop.set()
        await asyncio.wait_for(running.task, WAIT_S)
    assert not {"completed", "failed", "cancelled"} & set(events.of(body["task_id"]))
    queue = await channel.declare_queue(topology.transform, passive=True)
    assert queue.declaration_result.message_count == 1


async def test_a_stuck_instance_is_interrupted_and_the_task_retried_elsewhere(
    make_settings, channel, topology, events, photos, emulators
):
    """A prompt that never finishes is interrupted and retried elsewhere; the breaker opens."""
    emulators[0].faults.hang = True
    settings = make_settings(execution_timeout_s=0.5, comfyui_max_concurrency=1)
    tasks = [request(photos.url("photos/photo.jpg")) for _ in range(2)]
    async with running_service(settings) as running:
        for body in tasks:
            await publish(channel, topology, "transform", body)
        ends = [await events.terminal(body["task_id"]) for body in tasks]
        stuck = running.service._pool.find("comfy-0")
        assert stuck.consecutive_stuck >= 1
    assert all(end["event"] == "completed" and end["instance"] == "comfy-1" for end in ends), ends
    retried = [e for e in events.events if e["event"] == "retrying"]
    assert retried
    assert retried[0]["error"]["code"] == "timeout"


async def test_a_task_stuck_everywhere_fails_with_timeout(
    make_settings, channel, topology, events, photos, emulators
):
    """When every attempt gets stuck, the task fails with `timeout` after MAX_ATTEMPTS."""
    for emulator in emulators:
        emulator.faults.hang = True
    settings = make_settings(execution_timeout_s=0.3, max_attempts=2)
    body = request(photos.url("photos/photo.jpg"))
    async with running_service(settings):
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
    assert done["event"] == "failed"
    assert done["error"]["code"] == "timeout"
    assert done["attempt"] == 2


async def test_cancel_while_downloading(settings, channel, topology, events, photos):
    """A task cancelled while its photo downloads ends `cancelled` and never starts."""
    body = request(photos.url("slow/photo.jpg"))
    async with running_service(settings):
        await publish(channel, topology, "transform", body)
        async with asyncio.timeout(WAIT_S):
            await photos.slow_requested.wait()
        await publish(
            channel, topology, "cancel", {"user_id": "user_1", "task_id": body["task_id"]}
        )
        done = await events.terminal(body["task_id"])
    assert done["event"] == "cancelled"
    assert "started" not in events.of(body["task_id"])


async def test_cancel_while_queued_in_comfyui(
    make_settings, channel, topology, events, photos, emulators
):
    """A prompt staged in ComfyUI's queue is deleted from it when its task is cancelled."""
    comfy = emulators[0]
    comfy.faults.hang = True
    settings = make_settings(
        comfyui_instances=[ComfyInstanceSettings(url=comfy.url, name="solo", max_concurrency=2)]
    )
    running_task, staged = (request(photos.url("photos/photo.jpg")) for _ in range(2))
    async with running_service(settings), aiohttp.ClientSession() as http:
        await publish(channel, topology, "transform", running_task)
        await events.wait_for(
            lambda e: e["task_id"] == running_task["task_id"] and e["event"] == "started"
        )
        await publish(channel, topology, "transform", staged)
        await events.wait_for(
            lambda e: e["task_id"] == staged["task_id"] and e["event"] == "started"
        )
        await publish(
            channel, topology, "cancel", {"user_id": "user_1", "task_id": staged["task_id"]}
        )
        done = await events.terminal(staged["task_id"])
        async with http.get(f"{comfy.url}/queue") as resp:
            queue = await resp.json()
    assert done["event"] == "cancelled"
    assert queue["queue_pending"] == []
    assert len(queue["queue_running"]) == 1


async def test_instance_flaps_do_not_make_a_replica_hoard_messages(
    make_settings, channel, topology, events, photos, emulators
):
    """Prefetch follows capacity without stacking windows: never over 2x the slots in hand."""
    for emulator in emulators:
        emulator.faults.hang = True
    settings = make_settings(comfyui_outage_grace_s=30)
    bodies = [request(photos.url("photos/photo.jpg")) for _ in range(20)]
    async with running_service(settings) as running:
        pool, dispatcher = running.service._pool, running.service._dispatcher
        for body in bodies:
            await publish(channel, topology, "transform", body)
        await events.wait_for(lambda _: sum(x["event"] == "started" for x in events.events) >= 4)
        for _ in range(2):
            await emulators[0].die()
            async with asyncio.timeout(WAIT_S):
                while pool.healthy_capacity() != 2:
                    await pool.capacity_changed()
            await emulators[0].restart()
            async with asyncio.timeout(WAIT_S):
                while pool.healthy_capacity() != 4:
                    await pool.capacity_changed()
            assert dispatcher.in_flight <= 8
        assert dispatcher.in_flight <= 8


async def test_two_copies_of_a_task_arriving_together_run_once(
    settings, channel, topology, events, photos, emulators
):
    """A copy delivered while the first is being admitted attaches to it: one prompt each."""
    bodies = [request(photos.url("photos/photo.jpg")) for _ in range(6)]
    async with running_service(settings):
        before = sum(e.prompts_executed for e in emulators)
        for body in bodies:
            await publish(channel, topology, "transform", body)
            await publish(channel, topology, "transform", body)
        for body in bodies:
            await events.terminal(body["task_id"])
        queue = await channel.declare_queue(topology.transform, passive=True)
    assert sum(e.prompts_executed for e in emulators) - before == len(bodies)
    assert all(events.of(body["task_id"]).count("completed") == 1 for body in bodies)
    assert queue.declaration_result.message_count == 0


async def test_cancel_a_batch_reaches_running_and_queued_tasks(
    make_settings, channel, topology, events, photos, emulators
):
    """Cancelling a batch ends every task of it, those still in the queue included."""
    for emulator in emulators:
        emulator.faults.hang = True
    settings = make_settings(max_concurrent_tasks=1)
    body = {
        "batch_id": "b-cancel",
        "user_id": "user_1",
        "image_urls": [photos.url("photos/photo.jpg")] * 3,
        "style_type": "clay",
    }
    async with running_service(settings):
        await publish(channel, topology, "transform.batch", body)
        await events.wait_for(lambda e: e["event"] == "started")
        await publish(channel, topology, "cancel", {"user_id": "user_1", "batch_id": "b-cancel"})
        done = await events.wait_for(lambda e: e["event"] == "batch.completed")
        ends = [await events.terminal(f"b-cancel-{i}") for i in range(3)]
    assert [end["event"] for end in ends] == ["cancelled"] * 3
    assert (done["completed"], done["failed"], done["cancelled"]) == (0, 0, 3)
