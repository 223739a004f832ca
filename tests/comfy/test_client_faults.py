"""ComfyClient robustness: faults injected with the emulator's `Faults` (emulator only)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import aiohttp
import pytest

from consumer.comfy import ComfyClient
from consumer.errors import (
    ComfyExecutionError,
    InstanceUnavailable,
    TaskCancelled,
    TaskTimeout,
)
from consumer.testing.comfyui_emulator import ComfyEmulator
from tests.comfy.helpers import FAST, first_checkpoint, invert_prompt, png_bytes, sampler_prompt

pytestmark = pytest.mark.emulator_only


@pytest.fixture
async def emu_client(emulator: ComfyEmulator) -> AsyncIterator[ComfyClient]:
    async with ComfyClient(emulator.url, timeouts=FAST) as comfy:
        assert await comfy.wait_connected()
        yield comfy


async def until_idle(client: ComfyClient) -> None:
    """Poll the server until nothing runs (its queue has no event of its own)."""
    async with asyncio.timeout(5):
        while (await client.queue()).running:  # noqa: ASYNC110 - server state, over HTTP
            await asyncio.sleep(0.05)


async def uploaded(client: ComfyClient) -> str:
    return await client.upload_image(png_bytes(), "fault.png")


async def test_execution_error_names_node_and_exception(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """An `execution_error` becomes ComfyExecutionError with node id, class and message."""
    emulator.faults.execution_error_at = "ImageInvert"
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    with pytest.raises(ComfyExecutionError, match=r"node 2 \(ImageInvert\) raised"):
        await run.wait()


async def test_history_written_late_is_polled(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """`execution_success` before /history is written: wait() polls until the entry appears."""
    emulator.faults.history_delay_s = 0.3
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    async with asyncio.timeout(5):
        outputs = await run.wait()
    assert len(outputs) == 1


async def test_history_never_written_falls_back_to_socket_outputs(emulator: ComfyEmulator) -> None:
    """History later than history_wait_s: the files `executed` reported are used."""
    emulator.faults.history_delay_s = 2.0
    timeouts = dataclasses.replace(FAST, history_wait_s=0.2)
    async with ComfyClient(emulator.url, timeouts=timeouts) as comfy:
        run = await comfy.submit(invert_prompt(await uploaded(comfy)))
        async with asyncio.timeout(5):
            outputs = await run.wait()
    assert len(outputs) == 1


async def test_socket_dropped_mid_execution_loses_nothing(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """The WS closes after 2 sampler steps: the client reconnects, reconciles, and finishes."""
    emulator.faults.drop_ws_after_steps = 2
    emulator.faults.step_seconds = 0.02
    checkpoint = await first_checkpoint(emu_client)
    image = await uploaded(emu_client)
    runs = [await emu_client.submit(sampler_prompt(image, checkpoint)) for _ in range(3)]
    async with asyncio.timeout(10):
        results = await asyncio.gather(*(run.wait() for run in runs))
    assert all(len(outputs) == 1 for outputs in results)
    assert emu_client.connected


async def test_prompt_finished_while_disconnected_is_reconciled(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """Success happens while the socket is down: reconciliation reads it from /history."""
    emulator.faults.drop_ws_after_steps = 1
    checkpoint = await first_checkpoint(emu_client)
    run = await emu_client.submit(sampler_prompt(await uploaded(emu_client), checkpoint))
    async with asyncio.timeout(10):
        outputs = await run.wait()
    assert len(outputs) == 1


async def test_restarted_instance_fails_outstanding_as_retriable(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """Queue and history lost in a restart: the prompt fails as InstanceUnavailable."""
    emulator.faults.hang = True
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    queued = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    await run.wait_started()
    await emulator.die()
    await emulator.restart()
    async with asyncio.timeout(10):
        results = await asyncio.gather(run.wait(), queued.wait(), return_exceptions=True)
    for result in results:
        assert isinstance(result, InstanceUnavailable)
        assert result.retriable
        assert "vanished from its queue and history" in result.message


async def test_instance_that_stays_down_fails_outstanding(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """Socket down past outage_grace_s: outstanding prompts fail as InstanceUnavailable."""
    emulator.faults.hang = True
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    await run.wait_started()
    await emulator.die()
    async with asyncio.timeout(10):
        with pytest.raises(InstanceUnavailable, match="down for"):
            await run.wait()


async def test_500_on_submit_is_unavailable(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """POST /prompt answering 500 is retriable InstanceUnavailable, and nothing stays registered."""
    emulator.faults.reject_prompts_with_500 = True
    with pytest.raises(InstanceUnavailable, match="500"):
        await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    assert emu_client.outstanding == 0


async def test_never_finishing_prompt_times_out_and_is_interrupted(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """A hung prompt raises TaskTimeout after timeout_s and is interrupted on the instance."""
    emulator.faults.node_seconds = 0.5  # interruptible at node boundaries, unlike `hang`
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    with pytest.raises(TaskTimeout, match=r"ran past 0\.3s"):
        await run.wait(timeout_s=0.3)
    await until_idle(emu_client)


async def test_cancel_running_prompt_interrupts_it(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """cancel() on a running prompt sends /interrupt for it and ends as TaskCancelled."""
    emulator.faults.node_seconds = 0.2
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    await run.wait_started()
    await run.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(TaskCancelled):
            await run.wait()


async def test_cancel_queued_prompt_deletes_only_it(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """cancel() on a queued prompt deletes it; the running one is untouched."""
    emulator.faults.node_seconds = 0.1
    image = await uploaded(emu_client)
    first = await emu_client.submit(invert_prompt(image))
    second = await emu_client.submit(invert_prompt(image))
    await first.wait_started()
    await second.cancel()
    async with asyncio.timeout(5):
        with pytest.raises(TaskCancelled):
            await second.wait()
        assert await first.wait()


async def test_caller_cancellation_interrupts_the_prompt(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """Cancelling the task awaiting wait() stops our prompt on the instance too."""
    emulator.faults.node_seconds = 0.5
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    await run.wait_started()
    waiter = asyncio.create_task(run.wait())
    await asyncio.sleep(0)  # let wait() start
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await until_idle(emu_client)


async def test_interrupt_by_someone_else_is_retriable(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """Another client's global /interrupt fails our prompt as InstanceUnavailable."""
    emulator.faults.node_seconds = 0.3
    run = await emu_client.submit(invert_prompt(await uploaded(emu_client)))
    await run.wait_started()
    async with aiohttp.ClientSession() as other, other.post(f"{emulator.url}/interrupt") as answer:
        assert answer.status == 200
    with pytest.raises(InstanceUnavailable, match="interrupted by someone else"):
        await run.wait()


async def test_withdraw_takes_a_staged_prompt_back_unrun(
    emulator: ComfyEmulator, emu_client: ComfyClient
) -> None:
    """A prompt still queued is withdrawn and never runs; one already running is not
    touched by a withdraw and finishes."""
    emulator.faults.step_seconds = 0.05
    checkpoint = await first_checkpoint(emu_client)
    image = await uploaded(emu_client)
    running = await emu_client.submit(sampler_prompt(image, checkpoint, steps=10))
    staged = await emu_client.submit(sampler_prompt(image, checkpoint, steps=10))
    async with asyncio.timeout(5):
        await running.wait_started()
    assert await staged.withdraw()
    assert staged.done
    assert not await running.withdraw()
    async with asyncio.timeout(10):
        assert await running.wait()
    await until_idle(emu_client)
    assert await emu_client.history(staged.prompt_id) is None
    assert emulator.prompts_executed == 1
