"""Instances join and leave a running replica under load; no task is lost.

A replica discovers its instances from `comfy.test`, answered by a DNS server on loopback;
emulators listen on 127.0.0.2-.4 (one port, as pods behind a headless Service). While
tasks flow, the records change: removed instances drain (or, past a short grace, give
their prompts up to be retried elsewhere), added ones join. Every task must complete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from consumer.settings import ComfyInstanceSettings
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from tests.comfy.fleet import emulators_on, loopback_dns
from tests.e2e.harness import EventLog, Running, publish, request, running_service

pytestmark = [pytest.mark.connected, pytest.mark.slow]
log = logging.getLogger(__name__)

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
NAME = "comfy.test"
TASKS = 24
WAIT_S = 90.0
TERMINAL = {"completed", "failed", "cancelled"}


@pytest.fixture
def emulators() -> list[ComfyEmulator]:
    """None of the shared fixture's: this module runs its own fleet on 127.0.0.x."""
    return []


def ended(events: EventLog) -> int:
    return sum(1 for e in events.events if e.get("event") in TERMINAL)


async def until_ended(events: EventLog, count: int) -> None:
    await events.wait_for(lambda _: ended(events) >= count, timeout_s=WAIT_S)


async def health_names(running: Running) -> dict[str, bool]:
    """/health's instances: name -> draining."""
    async with aiohttp.ClientSession() as http, http.get(f"{running.sidecar}/health") as resp:
        body = await resp.json()
    return {i["name"]: i["draining"] for i in body["instances"]}


async def metric(running: Running, line_start: str) -> float:
    async with aiohttp.ClientSession() as http, http.get(f"{running.sidecar}/metrics") as resp:
        text = await resp.text()
    (line,) = [line for line in text.splitlines() if line.startswith(line_start)]
    return float(line.rsplit(" ", 1)[1])


async def publish_all(channel, topology, photos, count: int) -> list[dict[str, Any]]:
    bodies = [request(photos.url("photos/photo.jpg")) for _ in range(count)]
    for body in bodies:
        await publish(channel, topology, "transform", body)
    return bodies


def outcome(events: EventLog, bodies: Sequence[dict[str, Any]]) -> dict[str, int]:
    ids = {b["task_id"] for b in bodies}
    final = {e["task_id"]: e["event"] for e in events.events if e.get("event") in TERMINAL}
    retried = sum(1 for e in events.events if e.get("event") == "retrying")
    return {
        "tasks": len(ids),
        "completed": sum(1 for i in ids if final.get(i) == "completed"),
        "lost": sum(1 for i in ids if final.get(i) != "completed"),
        "retried": retried,
    }


async def test_instances_join_and_drain_under_load(
    make_settings, channel, topology, events, photos, tmp_path: Path
):
    """Records change three times mid-run; drained instances finish their prompts: all
    tasks complete, none retried, and /health and /metrics follow the membership."""
    with loopback_dns() as (records, nameserver):
        faults = Faults(step_seconds=0.02)  # 20 steps: about 0.4 s a prompt
        async with emulators_on(HOSTS, tmp_path / "fleet", faults) as (fleet, port):
            records.set(NAME, HOSTS[:2])
            settings = make_settings(
                comfyui_instances=[
                    ComfyInstanceSettings(
                        url=f"http://{NAME}:{port}", name="gpu", max_concurrency=2, discover=True
                    )
                ],
                comfyui_dns_nameservers=[nameserver],
                comfyui_discovery_interval_s=0.1,
                comfyui_drain_grace_s=30.0,
            )
            started = time.monotonic()
            async with running_service(settings) as running:
                bodies = await publish_all(channel, topology, photos, TASKS)
                await until_ended(events, TASKS // 4)
                records.set(NAME, HOSTS[1:])  # .2 drains, .4 joins
                await until_ended(events, TASKS // 2)
                records.set(NAME, HOSTS[2:])  # .3 drains
                await until_ended(events, 3 * TASKS // 4)
                records.set(NAME, [HOSTS[0], HOSTS[2]])  # .2 is back
                await until_ended(events, TASKS)
                back = {f"gpu/{HOSTS[0]}:{port}", f"gpu/{HOSTS[2]}:{port}"}
                await members_become(running, back)
                instances = await health_names(running)
                added = await metric(
                    running, 'style_consumer_instance_membership_changes_total{change="added"}'
                )
                removed = await metric(
                    running, 'style_consumer_instance_membership_changes_total{change="removed"}'
                )
            elapsed_s = time.monotonic() - started
    figures = outcome(events, bodies)
    executed = [e.prompts_executed for e in fleet]
    log.info(
        "membership under load: %s, prompts per instance %s, %.1fs", figures, executed, elapsed_s
    )
    assert figures == {"tasks": TASKS, "completed": TASKS, "lost": 0, "retried": 0}
    assert instances == dict.fromkeys(back, False)
    assert (added, removed) >= (4.0, 2.0)
    assert all(count > 0 for count in executed)


async def test_prompts_past_a_short_drain_grace_are_retried_elsewhere(
    make_settings, channel, topology, events, photos, tmp_path: Path
):
    """An instance removed with prompts running and a grace of 0.2 s: they are given up and
    withdrawn there; their tasks are retried on the other instance and all complete."""
    with loopback_dns() as (records, nameserver):
        faults = Faults(step_seconds=0.08)  # 20 steps: about 1.6 s a prompt, past the grace
        async with emulators_on(HOSTS[:2], tmp_path / "fleet", faults) as (fleet, port):
            records.set(NAME, HOSTS[:2])
            settings = make_settings(
                comfyui_instances=[
                    ComfyInstanceSettings(
                        url=f"http://{NAME}:{port}", name="gpu", max_concurrency=2, discover=True
                    )
                ],
                comfyui_dns_nameservers=[nameserver],
                comfyui_discovery_interval_s=0.1,
                comfyui_drain_grace_s=0.2,
            )
            async with running_service(settings) as running:
                bodies = await publish_all(channel, topology, photos, 6)
                leaving = f"gpu/{HOSTS[0]}:{port}"
                await events.wait_for(
                    lambda e: e["event"] == "started" and e.get("instance") == leaving,
                    timeout_s=WAIT_S,
                )
                records.set(NAME, HOSTS[1:2])
                await until_ended(events, len(bodies))
                await members_become(running, {f"gpu/{HOSTS[1]}:{port}"})
            queue = await queue_of(fleet[0])
    figures = outcome(events, bodies)
    log.info("short drain grace: %s", figures)
    assert figures["completed"] == figures["tasks"] == 6
    assert figures["lost"] == 0
    assert figures["retried"] >= 1
    assert queue == {"queue_running": [], "queue_pending": []}


async def members_become(running: Running, expected: set[str]) -> None:
    """Wait on the pool's membership events until its members are `expected`."""
    pool = running.service._pool
    assert pool is not None
    async with asyncio.timeout(WAIT_S):
        while {i.name for i in pool.instances} != expected:
            await pool.membership_event.wait()


async def queue_of(emulator: ComfyEmulator) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{emulator.url}/queue") as resp:
        return await resp.json()
