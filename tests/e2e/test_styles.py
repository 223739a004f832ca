"""A request published to RabbitMQ comes back as a styled image and a stream of events."""

from __future__ import annotations

import io

import aiohttp
import pytest
from PIL import Image

from tests.e2e.harness import publish, request, running_service

pytestmark = pytest.mark.connected
STYLES = ["clay", "anime", "realistic", "cartoon", "oil_painting"]


async def test_every_style_completes_with_events_in_order(
    settings, channel, topology, events, photos
):
    """Each of the five styles ends `completed` after accepted, started and progress events."""
    async with running_service(settings) as running:
        ids = {}
        for style in STYLES:
            body = request(photos.url("photos/photo.jpg"), style)
            ids[style] = body["task_id"]
            await publish(channel, topology, "transform", body)
        for style, task_id in ids.items():
            done = await events.terminal(task_id)
            assert done["event"] == "completed", done
            assert done["style_type"] == style
            kinds = events.of(task_id)
            assert kinds[0] == "accepted"
            assert kinds.index("started") < kinds.index("completed")
            assert "progress" in kinds
            assert done["progress"] == 100
            assert isinstance(done["seed"], int)
            assert done["timings_ms"]["total"] >= done["timings_ms"]["execute"] >= 0
            assert done["timings_ms"]["queued"] >= 0
            assert done["output_image_url"].startswith("http://outputs.test/outputs/")
        first = await events.terminal(ids["clay"])
        path = first["output_image_url"].removeprefix("http://outputs.test")
        async with aiohttp.ClientSession() as http, http.get(running.sidecar + path) as resp:
            assert resp.status == 200
            image = Image.open(io.BytesIO(await resp.read()))
            assert image.size == (640, 480)


async def test_progress_is_monotonic_and_started_names_the_instance(
    settings, channel, topology, events, photos
):
    """Progress percentages never go down within an attempt; started says which instance."""
    async with running_service(settings):
        body = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", body)
        await events.terminal(body["task_id"])
    mine = [e for e in events.events if e["task_id"] == body["task_id"]]
    started = next(e for e in mine if e["event"] == "started")
    assert started["instance"] in {"comfy-0", "comfy-1"}
    percents = [e["progress"] for e in mine if e["event"] == "progress"]
    assert percents == sorted(percents)
    assert all(e["metadata"] is None for e in mine)


async def test_request_fields_reach_the_workflow_and_metadata_is_echoed(
    settings, channel, topology, events, photos
):
    """custom_prompt, seed and metadata are honoured and echoed on every event."""
    async with running_service(settings):
        body = request(
            photos.url("photos/photo.jpg"),
            "anime",
            custom_prompt="a watercolour fox",
            seed=42,
            strength=0.5,
            metadata={"order": 7},
        )
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
    assert done["event"] == "completed"
    assert done["seed"] == 42
    mine = [e for e in events.events if e["task_id"] == body["task_id"]]
    assert all(e["metadata"] == {"order": 7} for e in mine)


async def test_presigned_upload_target_receives_the_result(
    settings, channel, topology, events, photos
):
    """With output.upload_url the image is PUT there and that URL (no query) is reported."""
    async with running_service(settings):
        body = request(
            photos.url("photos/photo.jpg"),
            output={"upload_url": photos.url("upload/result.png?sig=secret")},
        )
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
    assert done["event"] == "completed", done
    assert done["output_image_url"] == photos.url("upload/result.png")
    assert photos.uploads["result.png"].startswith(b"\x89PNG")
