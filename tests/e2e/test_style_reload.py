"""Styles change without a restart: a task in flight keeps its version, the next gets the new.

Each test runs a replica on a copy of the shipped workflows directory and edits it.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consumer.testing.comfyui_emulator import ComfyEmulator
from tests.e2e.harness import WAIT_S, publish, request, running_service
from tests.workflows.graphs import WORKFLOWS_DIR, edit_manifest, node_by_title, until_reloaded

pytestmark = pytest.mark.connected
STEP_S = 0.2  # 20 sampler steps: a task runs about 4 s until the test lets it finish
OLD_PROMPT = 'prompt = "Clay Style, lovely, 3d, cute"'
NEW_PROMPT = 'prompt = "Clay Style, glossy"'
ANIME = '[styles.anime]\nprompt = "Anime Style, beautiful, detailed"\nstrength = 0.7\n'


@pytest.fixture
def workflows(tmp_path: Path) -> Path:
    """A copy of the shipped workflows directory for the replica, to edit."""
    return Path(shutil.copytree(WORKFLOWS_DIR, tmp_path / "workflows"))


async def _get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _prompt_text(emulators: list[ComfyEmulator], record: dict[str, Any]) -> str:
    """The positive prompt of the graph the task's instance ran (from its /history)."""
    (emulator,) = [e for i, e in enumerate(emulators) if record["instance"] == f"comfy-{i}"]
    history = await _get_json(f"{emulator.url}/history/{record['prompt_id']}")
    graph = history[record["prompt_id"]]["prompt"][2]
    text: str = node_by_title(graph, "positive_prompt")["inputs"]["text"]
    return text


async def test_task_in_flight_keeps_its_version_the_next_gets_the_new(
    make_settings, workflows, emulators, channel, topology, events, photos
):
    """A reload (SIGHUP's entrypoint) mid-task: that task ends on the old style, the next runs
    the new one; events, the task lookup and the style_info metric say which."""
    settings = make_settings(workflows_dir=workflows, workflows_reload_interval_s=0)
    for emulator in emulators:
        emulator.faults.step_seconds = STEP_S
    async with running_service(settings) as running:
        styles = running.service.styles
        old = styles.get("clay").version
        first = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", first)
        await events.wait_for(lambda e: e["task_id"] == first["task_id"] and e["progress"] > 0)

        edit_manifest(workflows, OLD_PROMPT, NEW_PROMPT)
        reloaded = styles.attempted
        running.service.reload_styles()
        async with asyncio.timeout(WAIT_S):
            await reloaded.wait()
        new = styles.get("clay").version
        assert new != old
        assert not {"completed", "failed"} & set(events.of(first["task_id"]))  # still running

        for emulator in emulators:
            emulator.faults.step_seconds = 0
        second = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", second)
        for body in (first, second):
            assert (await events.terminal(body["task_id"]))["event"] == "completed"

        for body, version, prompt in ((first, old, "lovely"), (second, new, "glossy")):
            mine = [e for e in events.events if e["task_id"] == body["task_id"]]
            assert {e["style_version"] for e in mine} == {version}, body
            record = await _get_json(f"{running.sidecar}/api/v1/task/{body['task_id']}")
            assert record["style_version"] == version
            assert prompt in await _prompt_text(emulators, record)

        health = await _get_json(f"{running.sidecar}/health")
        assert health["catalog"]["styles"]["clay"] == new
        async with aiohttp.ClientSession() as http, http.get(running.sidecar + "/metrics") as resp:
            metrics = await resp.text()
    assert f'style_consumer_style_info{{style="clay",version="{new}"}} 1.0' in metrics
    assert f'version="{old}"' not in metrics
    assert 'style_consumer_tasks_total{status="completed",style="clay"} 2.0' in metrics


async def test_removed_style_refuses_requests_once_the_files_change(
    make_settings, workflows, channel, topology, events, photos
):
    """Polling sees a style removed from styles.toml; a request for it then fails with
    `unsupported_style` and no style_version, while the other styles still run."""
    settings = make_settings(workflows_dir=workflows, workflows_reload_interval_s=0.05)
    async with running_service(settings) as running:
        styles = running.service.styles
        edit_manifest(workflows, ANIME, "")
        await until_reloaded(styles, lambda: "anime" not in styles.current, WAIT_S)
        refused = request(photos.url("photos/photo.jpg"), "anime")
        served = request(photos.url("photos/photo.jpg"), "clay")
        await publish(channel, topology, "transform", refused)
        await publish(channel, topology, "transform", served)
        failed = await events.terminal(refused["task_id"])
        completed = await events.terminal(served["task_id"])
    assert failed["event"] == "failed"
    assert failed["error"]["code"] == "unsupported_style"
    assert failed["style_version"] is None
    assert completed["style_version"] == styles.get("clay").version
