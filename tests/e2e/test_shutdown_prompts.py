"""Shutdown and the prompts a replica staged in ComfyUI's queue but has not started."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import pytest

from consumer.comfy.messages import QueueState, parse_history, parse_queue
from consumer.settings import ComfyInstanceSettings
from consumer.state import task_key
from tests.e2e.harness import WAIT_S, publish, request, running_service

pytestmark = pytest.mark.connected

GRACE_S = 30.0
STEP_S = 0.1  # 20 sampler steps: a prompt runs about 2 s, far shorter than the grace
LEFT_WITHIN_S = 2.0  # "at once": well before the grace, before the running prompt ends


class QueueWatch:
    """An emulated instance's /queue, read again on every `status` its socket broadcasts."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session = session
        self._url = url
        self.state = QueueState()
        self._changed = asyncio.Condition()

    async def follow(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        async for message in ws:
            if message.type is aiohttp.WSMsgType.TEXT and message.json()["type"] == "status":
                async with self._session.get(f"{self._url}/queue") as answer:
                    state = parse_queue(await answer.json())
                async with self._changed:
                    self.state = state
                    self._changed.notify_all()

    async def kept(self, prompt_id: str) -> bool:
        """Still queued, or run to its end (never deleted, never interrupted)?"""
        async with self._session.get(f"{self._url}/queue") as answer:
            if prompt_id in parse_queue(await answer.json()):
                return True
        async with self._session.get(f"{self._url}/history/{prompt_id}") as answer:
            entry = parse_history(prompt_id, await answer.json())
        return entry is not None and entry.succeeded

    async def wait_for(
        self, predicate: Callable[[QueueState], bool], timeout_s: float = WAIT_S
    ) -> QueueState:
        """The first queue state that satisfies `predicate` (the current one included)."""
        async with asyncio.timeout(timeout_s), self._changed:
            await self._changed.wait_for(lambda: predicate(self.state))
            return self.state


@asynccontextmanager
async def watch_queue(url: str) -> AsyncIterator[QueueWatch]:
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(f"{url}/ws?clientId={uuid.uuid4().hex}") as ws,
    ):
        watch = QueueWatch(session, url)
        follower = asyncio.create_task(watch.follow(ws))
        try:
            yield watch
        finally:
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)


def one_running_one_staged(state: QueueState) -> bool:
    return len(state.running) == 1 and len(state.pending) == 1


@dataclass(frozen=True)
class Staged:
    """Two tasks on one instance: which runs, which waits behind it, and their prompts."""

    running_task: str
    staged_task: str
    running_prompt: str
    staged_prompt: str


async def stage_two(channel, topology, events, photos, queue: QueueWatch) -> Staged:
    """Publish two tasks for an instance of capacity 2; return once one prompt runs (its
    progress is reported) and the other is staged behind it."""
    tasks = [request(photos.url("photos/photo.jpg")) for _ in range(2)]
    for body in tasks:
        await publish(channel, topology, "transform", body)
    for body in tasks:  # both prompts submitted (the `started` event follows the submit)
        await events.wait_for(
            lambda e, t=body["task_id"]: e["task_id"] == t and e["event"] == "started"
        )
    first = (await events.wait_for(lambda e: e["event"] == "progress"))["task_id"]
    (other,) = {body["task_id"] for body in tasks} - {first}
    state = await queue.wait_for(one_running_one_staged)
    (staged,), (runs,) = state.pending, state.running
    return Staged(first, other, runs, staged)


@pytest.fixture
def one_slow_instance(emulators) -> list[ComfyInstanceSettings]:
    """The first emulator alone, capacity 2, with prompts of about 2 s."""
    emulators[0].faults.step_seconds = STEP_S
    return [ComfyInstanceSettings(url=emulators[0].url, name="comfy-0", max_concurrency=2)]


async def test_shutdown_deletes_the_staged_prompt_and_gives_its_task_back(
    make_settings, one_slow_instance, channel, topology, events, photos, emulators
):
    """On stop (memory store) a staged prompt leaves the instance's queue at once and its task
    goes back to the work queue; the running prompt completes within the grace."""
    settings = make_settings(comfyui_instances=one_slow_instance, shutdown_grace_s=GRACE_S)
    async with watch_queue(emulators[0].url) as queue, running_service(settings) as service:
        staged = await stage_two(channel, topology, events, photos, queue)
        service.stop.set()
        after = await queue.wait_for(lambda q: staged.staged_prompt not in q, LEFT_WITHIN_S)
        assert staged.running_prompt in after.running, "the running prompt was touched"
        await asyncio.wait_for(service.task, GRACE_S)
    assert (await events.terminal(staged.running_task))["event"] == "completed"
    assert not {"completed", "failed", "cancelled"} & set(events.of(staged.staged_task))
    work = await channel.declare_queue(topology.transform, passive=True)
    assert work.declaration_result.message_count == 1
    assert emulators[0].prompts_executed == 1


async def test_a_staged_prompt_left_at_shutdown_is_adopted_by_the_next_replica(
    make_settings, one_slow_instance, redis_url, redis_store, channel, topology, events, photos
):
    """Redis store: the staged prompt outlives the grace on its instance, and the replica that
    gets its task next completes the task from that very prompt."""
    settings = make_settings(
        comfyui_instances=one_slow_instance,
        shutdown_grace_s=0.5,
        state_backend="redis",
        redis_url=redis_url,
        redis_key_prefix=redis_store._prefix,
        lease_ttl_s=1.0,
    )
    async with watch_queue(one_slow_instance[0].url) as queue:
        async with running_service(settings) as service:
            staged = await stage_two(channel, topology, events, photos, queue)
            service.stop.set()
            await asyncio.wait_for(service.task, WAIT_S)
        assert await queue.kept(staged.staged_prompt), "the staged prompt was deleted"
        async with running_service(settings):
            ends = [await events.terminal(t) for t in (staged.running_task, staged.staged_task)]
    assert [end["event"] for end in ends] == ["completed", "completed"], ends
    record = await redis_store.get(task_key("user_1", staged.staged_task))
    assert record is not None
    assert record.prompt_id == staged.staged_prompt
