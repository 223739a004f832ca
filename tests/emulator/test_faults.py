"""Fault injection: every `Faults` switch, interrupts, and die/restart of the emulator."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from tests.emulator.conftest import img2img, invert
from tests.emulator.scenarios import idle_pred

TRACES = Path(__file__).resolve().parents[1] / "data" / "comfyui-traces"


def _recorded_error_keys() -> set[str]:
    items = json.loads((TRACES / "errors.json").read_text())
    errors = [
        it["message"]["data"]
        for it in items
        if it["kind"] == "ws_text" and it["message"]["type"] == "execution_error"
    ]
    return set(errors[0])


async def test_step_seconds_paces_sampler_progress(comfy, connect):
    """KSampler sends one progress per step and takes at least steps x step_seconds."""
    comfy.faults.step_seconds = 0.02
    client = await connect()
    image = await client.upload()
    loop = asyncio.get_running_loop()
    started = loop.time()
    pid = await client.submit(img2img(image, steps=5))
    await client.wait_done(pid)
    assert loop.time() - started >= 0.1
    progress = client.messages("progress", pid)
    assert [(m["data"]["value"], m["data"]["max"], m["data"]["node"]) for m in progress] == [
        (i, 5, "6") for i in range(1, 6)
    ]


async def test_model_switch_costs_load_time_and_same_model_is_cached(comfy, connect):
    """Changing checkpoint pays model_load_seconds; reusing it serves the loader from cache."""
    comfy.faults.model_load_seconds = 0.2
    client = await connect()
    image = await client.upload()
    first = await client.submit(img2img(image, seed=1))
    await client.wait_done(first)
    again = await client.submit(img2img(image, seed=2))
    await client.wait_done(again)
    assert client.messages("execution_cached", again)[0]["data"]["nodes"] == [
        "1",
        "2",
        "3",
        "4",
        "5",
    ]
    loop = asyncio.get_running_loop()
    started = loop.time()
    switch = await client.submit(img2img(image, seed=2, ckpt="random-sd15-b.safetensors"))
    await client.wait_done(switch)
    assert loop.time() - started >= 0.2


@pytest.mark.parametrize("where", ["KSampler", "6"])
async def test_execution_error_at_class_or_id(comfy, connect, where):
    """execution_error_at raises in that node: the real payload shape, then an error history."""
    comfy.faults.execution_error_at = where
    client = await connect()
    image = await client.upload()
    pid = await client.submit(img2img(image))
    await client.wait_done(pid)
    error = client.messages("execution_error", pid)[0]["data"]
    assert set(error) == _recorded_error_keys()
    assert (error["node_id"], error["node_type"]) == ("6", "KSampler")
    assert error["executed"] == ["2", "1", "5", "4", "3"]
    status = (await client.history(pid))[pid]["status"]
    assert (status["status_str"], status["completed"]) == ("error", False)
    assert status["messages"][-1][0] == "execution_error"


async def test_drop_ws_after_steps_closes_sockets_once(comfy, connect):
    """Sockets close after N sampler steps; the prompt still finishes and the fault resets."""
    comfy.faults.drop_ws_after_steps = 2
    client = await connect()
    image = await client.upload()
    pid = await client.submit(img2img(image, steps=4))
    await client.trace.wait_for(lambda m: m["type"] == "progress" and m["data"]["value"] == 2)
    async with asyncio.timeout(10):
        await client.socket._reader
    assert client.socket._ws.closed
    assert comfy.faults.drop_ws_after_steps is None
    start = len(client.trace.items)
    await client.socket.open()  # its first status already says idle if the prompt is done
    assert await client.trace.wait_for(idle_pred, start)
    assert (await client.history(pid))[pid]["status"]["status_str"] == "success"


async def test_reject_prompts_with_500(comfy, connect):
    """POST /prompt answers aiohttp's plain-text 500 while the fault is on."""
    comfy.faults.reject_prompts_with_500 = True
    client = await connect()
    status, body = await client.post("/prompt", json={"prompt": {}})
    assert (status, client.trace.items[-1]["content_type"]) == (500, "text/plain; charset=utf-8")
    assert body.startswith("500 Internal Server Error")


async def test_history_delay_keeps_history_empty_after_success(comfy, connect):
    """With history_delay_s, /history is {} after execution_success until the late write."""
    comfy.faults.history_delay_s = 0.3
    client = await connect()
    image = await client.upload()
    pid = await client.submit(invert(image))
    await client.wait(lambda m: m["type"] == "execution_success")
    assert await client.history(pid) == {}
    await client.wait_done(pid)
    assert pid in await client.history(pid)


async def test_hang_then_die_and_restart(comfy, connect):
    """A hung prompt stays running; die drops sockets and forgets; restart serves the same URL."""
    comfy.faults.hang = True
    client = await connect()
    image = await client.upload()
    pid = await client.submit(invert(image))
    await client.wait(lambda m: m["type"] == "executing" and m["data"].get("node") == "1")
    _, queue = await client.get("/queue")
    assert [item[1] for item in queue["queue_running"]] == [pid]
    url = comfy.url
    await comfy.die()
    async with asyncio.timeout(10):
        await client.socket._reader
    with pytest.raises(aiohttp.ClientConnectionError):
        await client.get("/prompt")
    comfy.faults.hang = False
    await comfy.restart()
    assert comfy.url == url
    assert (await client.get("/queue"))[1] == {"queue_running": [], "queue_pending": []}
    assert await client.history(pid) == {}
    _, answer = await client.post("/prompt", json={"prompt": invert(image)})
    assert answer["number"] == 0


async def test_interrupt_lands_at_a_sampler_step(comfy, connect):
    """A global /interrupt during sampling ends the prompt with execution_interrupted there."""
    comfy.faults.step_seconds = 0.05
    client = await connect()
    image = await client.upload()
    pid = await client.submit(img2img(image, steps=100))
    await client.wait(lambda m: m["type"] == "progress")
    await client.post("/interrupt")
    await client.wait_done(pid)
    interrupted = client.messages("execution_interrupted", pid)[0]["data"]
    assert (interrupted["node_id"], interrupted["node_type"]) == ("6", "KSampler")
    assert len(client.messages("progress", pid)) < 100
    assert comfy.prompts_executed == 1


async def test_pending_interrupt_is_noop_and_delete_removes(comfy, connect):
    """Interrupting a pending prompt does nothing; deleting it means it never runs."""
    comfy.faults.step_seconds = 0.05
    client = await connect()
    image = await client.upload()
    running = await client.submit(img2img(image, steps=5))
    kept = await client.submit(img2img(image, steps=5, seed=5))
    dropped = await client.submit(img2img(image, steps=5, seed=6))
    await client.post("/interrupt", json={"prompt_id": kept})
    await client.post("/queue", json={"delete": [dropped]})
    await client.wait_done(kept)
    assert await client.history(dropped) == {}
    for pid in (running, kept):
        assert (await client.history(pid))[pid]["status"]["status_str"] == "success"
