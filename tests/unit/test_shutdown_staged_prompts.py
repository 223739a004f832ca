"""`Dispatcher.drain` and the prompts staged on an instance behind a running one: deleted and
given back at once, or (with a shared store) left queued for another replica to adopt.

No broker: fake deliveries and the memory store; prompts go to the ComfyUI emulator, where the
first one hangs so the second stays staged behind it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from consumer.comfy import ComfyClient, PromptRun
from consumer.dispatcher import Dispatcher
from consumer.pipeline import Result
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from contracts.models import TransformRequest
from tests.comfy.helpers import FAST, invert_prompt, png_bytes
from tests.fakes import FakeMessage
from tests.world import SETTLE_WAIT_S, dispatcher_world

GRACE_S = 0.5


@dataclass
class PromptPipeline:
    """Runs each job as one prompt on the emulator, with `job.run` set while it is there
    (as `Pipeline._run_prompt` does)."""

    client: ComfyClient
    image: str
    runs: list[PromptRun] = field(default_factory=list)
    submitted: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, job: Any) -> Result:
        run = job.run = await self.client.submit(invert_prompt(self.image))
        self.runs.append(run)
        self.submitted.set()
        try:
            await run.wait()
        finally:
            job.run = None
        return Result(urls=[f"http://outputs.test/{job.task_id}.png"])


@dataclass
class Staged:
    """Two tasks on one instance: the first one's prompt runs (and hangs), the second waits."""

    dispatcher: Dispatcher
    client: ComfyClient
    running: tuple[FakeMessage, PromptRun]
    staged: tuple[FakeMessage, PromptRun]


async def start_task(dispatcher: Dispatcher, pipeline: PromptPipeline, n: int) -> FakeMessage:
    """Deliver task `n` and return once its prompt is on the instance."""
    body = {"task_id": f"t-{n}", "user_id": "user_1", "image_url": "https://x.test/a.jpg"}
    raw = orjson.dumps({**body, "style_type": "clay"})
    message = FakeMessage(body=raw)
    pipeline.submitted.clear()
    request = TransformRequest.model_validate_json(raw)
    assert await dispatcher.submit(message, request) is None  # type: ignore[arg-type]
    async with asyncio.timeout(SETTLE_WAIT_S):
        await pipeline.submitted.wait()
    return message


@asynccontextmanager
async def staged_world(tmp_path: Path, *, prompts_adoptable: bool) -> AsyncIterator[Staged]:
    async with (
        ComfyEmulator(Faults(hang=True), output_dir=tmp_path / "comfy") as comfy,
        ComfyClient(comfy.url, timeouts=FAST) as client,
    ):
        assert await client.wait_connected()
        pipeline = PromptPipeline(client, await client.upload_image(png_bytes(), "staged.png"))
        wiring = dispatcher_world(
            pipeline, prompts_adoptable=prompts_adoptable, closing_grace_s=0.0
        )
        async with wiring as w:
            first = await start_task(w.dispatcher, pipeline, 1)
            async with asyncio.timeout(SETTLE_WAIT_S):
                await pipeline.runs[0].wait_started()
            second = await start_task(w.dispatcher, pipeline, 2)
            running, staged = (first, pipeline.runs[0]), (second, pipeline.runs[1])
            yield Staged(w.dispatcher, client, running, staged)


async def test_a_staged_prompt_is_deleted_and_its_task_given_back_at_once(tmp_path):
    """Memory store: drain deletes the staged prompt and nacks its delivery before the grace
    ends, while the running task is left to run."""
    async with staged_world(tmp_path, prompts_adoptable=False) as world:
        (staged, staged_run), (running, _) = world.staged, world.running
        drain = asyncio.create_task(world.dispatcher.drain(GRACE_S))
        async with asyncio.timeout(SETTLE_WAIT_S):
            await staged.settled.wait()
        assert staged.settlements == ["nack+requeue"]
        assert staged_run.prompt_id not in await world.client.queue()
        assert not running.settled.is_set()
        assert not drain.done()
        async with asyncio.timeout(SETTLE_WAIT_S):
            await drain
        assert running.settlements == ["nack+requeue"]


async def test_a_staged_prompt_is_left_queued_for_adoption(tmp_path):
    """Shared store: the staged prompt outlives the drain on its instance, and both deliveries
    are given back when the grace ends."""
    async with staged_world(tmp_path, prompts_adoptable=True) as world:
        (staged, staged_run), (running, _) = world.staged, world.running
        async with asyncio.timeout(SETTLE_WAIT_S):
            await world.dispatcher.drain(GRACE_S)
        assert staged_run.prompt_id in await world.client.queue()
        assert staged.settlements == running.settlements == ["nack+requeue"]
