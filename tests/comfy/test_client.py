"""ComfyClient against the emulator (or a real ComfyUI when COMFYUI_TEST_URL is set)."""

from __future__ import annotations

import asyncio

import pytest

from consumer.comfy import ComfyClient, PromptRun
from consumer.errors import ComfyRejected, InstanceUnavailable, TaskCancelled
from tests.comfy.helpers import FAST, invert_prompt, png_bytes


async def collect(run: PromptRun) -> list[int]:
    return [figure async for figure in run.progress()]


async def test_upload_returns_the_load_image_value(client: ComfyClient) -> None:
    """An upload lands in our subfolder and returns `subfolder/name` for LoadImage."""
    image = await client.upload_image(png_bytes(), "task-abc.png")
    assert image == "style-consumer/task-abc.png"


async def test_prompt_runs_to_outputs_and_bytes(client: ComfyClient) -> None:
    """submit -> wait gives the SaveImage files; view fetches a PNG."""
    image = await client.upload_image(png_bytes(), "task-run.png")
    run = await client.submit(invert_prompt(image))
    async with asyncio.timeout(10):
        outputs = await run.wait()
    assert len(outputs) == 1
    assert outputs[0].type == "output"
    data = await client.view(outputs[0])
    assert data.startswith(b"\x89PNG")
    assert client.outstanding == 0


async def test_progress_is_monotonic_and_ends_at_100(client: ComfyClient) -> None:
    """The progress stream only rises and closes with 100 after success."""
    image = await client.upload_image(png_bytes(), "task-progress.png")
    run = await client.submit(invert_prompt(image))
    async with asyncio.timeout(10):
        figures, _ = await asyncio.gather(collect(run), run.wait())
    assert figures == sorted(set(figures))
    assert figures[-1] == 100


async def test_progress_can_be_drained_before_wait(client: ComfyClient) -> None:
    """Iterating progress to its end, then calling wait(), neither hangs nor loses outputs."""
    image = await client.upload_image(png_bytes(), "task-drain.png")
    run = await client.submit(invert_prompt(image))
    async with asyncio.timeout(10):
        figures = await collect(run)
        outputs = await run.wait()
    assert figures[-1] == 100
    assert len(outputs) == 1


async def test_many_prompts_share_one_socket(client: ComfyClient) -> None:
    """Concurrent prompts on one client all finish, routed by prompt id over one socket."""
    image = await client.upload_image(png_bytes(), "task-many.png")
    runs = [await client.submit(invert_prompt(image)) for _ in range(4)]
    async with asyncio.timeout(20):
        results = await asyncio.gather(*(run.wait() for run in runs))
    names = {outputs[0].filename for outputs in results}
    assert len(names) == 4


async def test_identical_resubmit_is_served_from_cache(client: ComfyClient) -> None:
    """All nodes cached (no `executing`, one replayed `executed`): it still completes at 100."""
    image = await client.upload_image(png_bytes(), "task-cache.png")
    prompt = invert_prompt(image)
    first = await (await client.submit(prompt)).wait()
    run = await client.submit(prompt)
    async with asyncio.timeout(10):
        figures, again = await asyncio.gather(collect(run), run.wait())
    assert again == first
    assert figures[-1] == 100


async def test_rejected_prompt_names_node_and_input(client: ComfyClient) -> None:
    """A 400 becomes ComfyRejected naming node id, class, title and the failing input."""
    with pytest.raises(ComfyRejected) as caught:
        await client.submit(invert_prompt("style-consumer/does-not-exist.png"))
    message = caught.value.message
    assert "node 1 (LoadImage 'input_image')" in message
    assert "input 'image'" in message
    assert client.outstanding == 0


async def test_unknown_node_class_is_rejected(client: ComfyClient) -> None:
    """A node class the server lacks is a permanent rejection naming the class."""
    prompt = invert_prompt("x.png")
    prompt["2"]["class_type"] = "NoSuchNode"
    with pytest.raises(ComfyRejected, match="NoSuchNode"):
        await client.submit(prompt)


async def test_cancel_after_finish_changes_nothing(client: ComfyClient) -> None:
    """Cancelling a run that already ended is a no-op."""
    image = await client.upload_image(png_bytes(), "task-late-cancel.png")
    run = await client.submit(invert_prompt(image))
    outputs = await run.wait()
    await run.cancel()
    assert outputs


async def test_cancel_before_start_deletes_it(client: ComfyClient) -> None:
    """A prompt cancelled while still queued ends as TaskCancelled, never as a hang."""
    image = await client.upload_image(png_bytes(), "task-cancel.png")
    runs = [await client.submit(invert_prompt(image)) for _ in range(3)]
    await runs[-1].cancel()
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(r.wait() for r in runs), return_exceptions=True)
    assert all(isinstance(r, list) for r in results[:-1])
    assert isinstance(results[-1], list | TaskCancelled)  # it may have run before the delete


async def test_introspection(client: ComfyClient) -> None:
    """system_stats, queue and node classes read the instance's state."""
    stats = await client.system_stats()
    assert "system" in stats
    queue = await client.queue()
    assert not queue.running
    classes = await client.node_classes()
    assert {"LoadImage", "ImageInvert", "SaveImage"} <= classes


async def test_unreachable_instance_is_unavailable() -> None:
    """No server on the port: submit and HTTP calls raise InstanceUnavailable."""
    timeouts = FAST.__class__(connect_s=0.3, request_s=0.5)
    async with ComfyClient("http://127.0.0.1:9", timeouts=timeouts) as comfy:
        with pytest.raises(InstanceUnavailable, match="no websocket"):
            await comfy.submit(invert_prompt("x.png"))
        with pytest.raises(InstanceUnavailable, match="system_stats"):
            await comfy.system_stats()
