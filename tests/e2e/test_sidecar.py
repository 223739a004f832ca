"""The sidecar: health, readiness, stats, task lookup with its token, metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from tests.e2e.harness import publish, request, running_service

pytestmark = pytest.mark.connected


async def _get(url, token=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


async def test_health_readiness_and_lookup(make_settings, channel, topology, events, photos):
    """Health and readiness are open; task lookups need the bearer token when one is set."""
    settings = make_settings(sidecar_token="s3cret")
    async with running_service(settings) as running:
        base = running.sidecar
        body = request(photos.url("photos/photo.jpg"), user_id="alice")
        await publish(channel, topology, "transform", body)
        await events.terminal(body["task_id"])

        assert (await _get(base + "/healthz"))[0] == 200
        status, ready = await _get(base + "/readyz")
        assert status == 200, ready
        assert set(ready["ok"]) == {"broker", "consuming", "comfyui", "state_store"}
        status, health = await _get(base + "/health")
        assert health["status"] == "healthy"
        assert {i["name"] for i in health["instances"]} == {"comfy-0", "comfy-1"}

        assert (await _get(f"{base}/api/v1/task/{body['task_id']}"))[0] == 401
        assert (await _get(f"{base}/api/v1/task/{body['task_id']}", "wrong"))[0] == 401
        status, task = await _get(f"{base}/api/v1/task/{body['task_id']}", "s3cret")
        assert status == 200
        assert task["status"] == "completed"
        assert task["output_image_url"].startswith("http://outputs.test/outputs/")
        status, listing = await _get(f"{base}/api/v1/user/alice/tasks?limit=5", "s3cret")
        assert [t["task_id"] for t in listing["tasks"]] == [body["task_id"]]
        assert (await _get(f"{base}/api/v1/task/nope", "s3cret"))[0] == 404
        assert (await _get(f"{base}/api/v1/user/alice/tasks?limit=0", "s3cret"))[0] == 400

        status, stats = await _get(base + "/api/v1/stats")
        assert stats["tasks"]["by_status"]["completed"] == 1
        assert stats["tasks"]["by_style"] == {"clay": 1}


async def test_readiness_fails_without_a_healthy_instance(
    make_settings, channel, topology, events, emulators
):
    """When every instance is down, /readyz answers 503 naming comfyui, and intake stops."""
    async with running_service(make_settings()) as running:
        for emulator in emulators:
            await emulator.die()
        status, ready = await _wait_not_ready(running)
    assert status == 503
    assert "comfyui" in ready["failing"]


async def _wait_not_ready(running):
    pool = running.service._pool
    async with asyncio.timeout(20):
        while pool.healthy_capacity() > 0:
            await pool.capacity_changed()
    return await _get(running.sidecar + "/readyz")


async def test_metrics_are_exposed(settings, channel, topology, events, photos):
    """Prometheus text carries task, stage, instance, message and event metrics."""
    async with running_service(settings) as running:
        body = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", body)
        await events.terminal(body["task_id"])
        status, text = await _get(running.sidecar + "/metrics")
    assert status == 200
    for name in (
        'style_consumer_tasks_total{status="completed",style="clay"} 1.0',
        "style_consumer_stage_duration_seconds_bucket",
        'style_consumer_instance_capacity{instance="comfy-0"} 2.0',
        'style_consumer_messages_consumed_total{kind="transform"} 1.0',
        'style_consumer_events_published_total{event="completed"} 1.0',
        "style_consumer_broker_connected",
    ):
        assert name in text, name
