"""Model memory: what a prompt finds cached and which model load it pays, as on ComfyUI 0.8.0.

Real ComfyUI (CPU, random SD 1.5 checkpoints A and B, five prompts on one server): A 8.2 s
cold, A 3.6 s (loader, both text encodes and VAE encode cached), B 9.9 s cold, A 5.8 s and
B 4.9 s (only LoadImage cached: the classic cache keeps what the current prompt uses, and the
file re-read is served by the page cache). Costs are read from the emulator's log of charged
loads, and its `sleep` returns at once: nothing here depends on wall-clock timing.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from consumer.testing import ComfyEmulator, Faults
from consumer.testing.comfyui_emulator import main
from consumer.testing.emulator_models import LoadKind
from tests.emulator.conftest import img2img, invert

A, B = "random-sd15.safetensors", "random-sd15-b.safetensors"
LORA = "watercolor-sd15.safetensors"


async def _instant(_seconds: float) -> None:
    await asyncio.sleep(0)


@pytest.fixture
async def comfy(tmp_path: Path) -> AsyncIterator[ComfyEmulator]:
    """An emulator whose model loads cost 3 s of its own clock, waited out instantly."""
    faults = Faults(model_load_seconds=3.0)
    async with ComfyEmulator(faults, tmp_path, sleep=_instant) as emulator:
        yield emulator


async def _run(client, prompt: dict[str, Any]) -> tuple[list[str], list[str]]:
    """Submit, wait; (execution_cached nodes, nodes that executed)."""
    pid = await client.submit(prompt)
    await client.wait_done(pid)
    cached = client.messages("execution_cached", pid)[0]["data"]["nodes"]
    executing = [m["data"]["node"] for m in client.messages("executing", pid)]
    return cached, [n for n in executing if n is not None]


def _charges(comfy: ComfyEmulator, start: int) -> list[tuple[str, LoadKind, float]]:
    return [(load.name, load.kind, load.seconds) for load in comfy.model_loads[start:]]


async def test_a_a_b_a_b_matches_real_comfyui(comfy, connect):
    """Cached lists and load costs of A, A, B, A, B: cold, cached, cold, recent, recent."""
    client = await connect()
    image = await client.upload()
    expected = [
        (A, [], [(A, LoadKind.COLD, 3.0)]),
        (A, ["1", "2", "3", "4", "5"], []),
        (B, ["1"], [(B, LoadKind.COLD, 3.0)]),
        (A, ["1"], [(A, LoadKind.RECENT, pytest.approx(0.96))]),
        (B, ["1"], [(B, LoadKind.RECENT, pytest.approx(0.96))]),
    ]
    for seed, (ckpt, cached_nodes, charges) in enumerate(expected, start=1):
        start = len(comfy.model_loads)
        cached, ran = await _run(client, img2img(image, ckpt=ckpt, seed=seed))
        assert (cached, _charges(comfy, start)) == (cached_nodes, charges), seed
        assert ran == [n for n in ["2", "1", "5", "4", "3", "6", "7", "8"] if n not in cached]


async def test_load_is_charged_inside_the_loader_node(comfy, connect):
    """The load happens while CheckpointLoaderSimple runs (executing 2, before executing 1)."""
    client = await connect()
    image = await client.upload()
    pid = await client.submit(img2img(image, ckpt=A))
    await client.wait_done(pid)
    (load,) = comfy.model_loads
    assert (load.prompt_id, load.node_id, load.name) == (pid, "2", A)


async def test_explicit_reload_seconds_and_a_prompt_without_the_loader(comfy, connect):
    """A prompt that does not use the loader evicts it; the next run pays model_reload_seconds."""
    comfy.faults.model_reload_seconds = 0.5
    client = await connect()
    image = await client.upload()
    await _run(client, img2img(image, ckpt=A))
    assert (await _run(client, invert(image)))[0] == ["1"]
    start = len(comfy.model_loads)
    cached, _ = await _run(client, img2img(image, ckpt=A, seed=2))
    assert (cached, _charges(comfy, start)) == (["1"], [(A, LoadKind.RECENT, 0.5)])


async def test_restart_forgets_the_cache_but_not_the_page_cache(comfy, connect):
    """A process restart: nothing cached, and the checkpoint read before reloads as recent."""
    client = await connect()
    image = await client.upload()
    await _run(client, img2img(image, ckpt=A))
    await client.socket.close()
    await comfy.restart()
    client = await connect()
    start = len(comfy.model_loads)
    cached, _ = await _run(client, img2img(image, ckpt=A))
    assert (cached, _charges(comfy, start)) == ([], [(A, LoadKind.RECENT, pytest.approx(0.96))])


@pytest.mark.parametrize(
    ("body", "cached_after", "kinds"),
    [
        ({"unload_models": True, "free_memory": True}, [], [LoadKind.RECENT]),
        ({"unload_models": True}, ["1", "2", "3", "4", "5"], []),
    ],
)
async def test_free(comfy, connect, body, cached_after, kinds):
    """/free free_memory resets the node cache before the next prompt; unload_models alone
    (VRAM only, none on this CPU server) keeps the loader cached."""
    client = await connect()
    image = await client.upload()
    await _run(client, img2img(image, ckpt=A))
    assert (await client.post("/free", json=body))[0] == 200
    start = len(comfy.model_loads)
    cached, _ = await _run(client, img2img(image, ckpt=A, seed=2))
    assert (cached, [load.kind for load in comfy.model_loads[start:]]) == (cached_after, kinds)


def _with_lora(prompt: dict[str, Any], strength: float = 0.8) -> dict[str, Any]:
    lora_inputs = {"model": ["2", 0], "clip": ["2", 1], "lora_name": LORA,
                   "strength_model": strength, "strength_clip": strength}  # fmt: skip
    prompt["9"] = {"class_type": "LoraLoader", "inputs": lora_inputs}
    prompt["3"]["inputs"]["clip"] = ["9", 1]
    prompt["4"]["inputs"]["clip"] = ["9", 1]
    prompt["6"]["inputs"]["model"] = ["9", 0]
    return prompt


async def test_lora_loads(comfy, connect):
    """A LoRA read costs lora_load_seconds (default 0.1 x a cold load) once per node instance;
    a cached or same-file LoraLoader reads nothing; zero strengths read nothing."""
    client = await connect()
    image = await client.upload()
    runs = [
        (_with_lora(img2img(image, ckpt=A)), [(A, "cold"), (LORA, "lora")]),
        (_with_lora(img2img(image, ckpt=A, seed=2)), []),
        (_with_lora(img2img(image, ckpt=A), strength=0.5), []),
        (_with_lora(img2img(image, ckpt=B)), [(B, "cold")]),
        (_with_lora(img2img(image, ckpt=A), strength=0.0), [(A, "recent")]),
    ]
    for i, (prompt, charges) in enumerate(runs):
        start = len(comfy.model_loads)
        await _run(client, prompt)
        assert [(load.name, load.kind) for load in comfy.model_loads[start:]] == charges, i
    lora_load = comfy.model_loads[1]
    assert (lora_load.node_id, lora_load.seconds) == ("9", pytest.approx(0.3))


async def test_lora_model_only_runs_and_is_listed(connect):
    """LoraLoaderModelOnly feeds KSampler; both LoRA nodes and their files are listed."""
    client = await connect()
    image = await client.upload()
    prompt = img2img(image)
    prompt["9"] = {
        "class_type": "LoraLoaderModelOnly",
        "inputs": {"model": ["2", 0], "lora_name": LORA, "strength_model": 1.0},
    }
    prompt["6"]["inputs"]["model"] = ["9", 0]
    pid = await client.submit(prompt)
    await client.wait_done(pid)
    assert (await client.history(pid))[pid]["status"]["status_str"] == "success"
    _, info = await client.get("/object_info/LoraLoaderModelOnly")
    node = info["LoraLoaderModelOnly"]
    assert (node["output"], node["input"]["required"]["lora_name"][0]) == (
        ["MODEL"],
        ["detail-tweaker-sd15.safetensors", LORA],
    )
    _, lora = await client.get("/object_info/LoraLoader")
    assert list(lora["LoraLoader"]["input"]["required"]) == [
        "model", "clip", "lora_name", "strength_model", "strength_clip",
    ]  # fmt: skip
    assert (await client.get("/models/loras"))[1] == node["input"]["required"]["lora_name"][0]


def test_help_documents_the_model_flags(capsys):
    """--help lists the load, reload and LoRA costs with their defaults."""
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag in ("--model-load-seconds", "--model-reload-seconds", "--lora-load-seconds"):
        assert flag in text
    assert "default 0.32 x" in text
    assert "default 0.1 x" in text
