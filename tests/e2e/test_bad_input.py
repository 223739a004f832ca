"""Bad inputs end as `failed` with the exact error code; the service keeps running."""

from __future__ import annotations

import io

import aiohttp
import pytest
from PIL import Image

from tests.e2e.harness import publish, request, running_service

pytestmark = pytest.mark.connected


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("photos/missing.jpg", "image_download_failed"),
        ("photos/not-image.txt", "image_invalid"),
        ("photos/truncated.jpg", "image_invalid"),
        ("photos/bomb.png", "image_too_large"),
    ],
)
async def test_bad_image_fails_with_its_code(
    settings, channel, topology, events, photos, path, code
):
    """A 404, a non-image, a truncated JPEG and a decompression bomb each fail with their code."""
    async with running_service(settings):
        body = request(photos.url(path))
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
    assert done["event"] == "failed"
    assert done["error"]["code"] == code, done["error"]
    assert done["error"]["retriable"] is False
    assert done["status"] == "failed"


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:{port}/photos/photo.jpg",  # a name resolving to loopback
        "http://169.254.169.254/latest/meta-data/",  # cloud metadata
        "http://[::1]:{port}/photos/photo.jpg",  # IPv6 loopback literal
        "http://10.0.0.1/photo.jpg",  # private range
    ],
)
async def test_ssrf_attempts_are_refused(settings, channel, topology, events, photos, url):
    """Hosts resolving to loopback, link-local or private addresses are refused."""
    port = photos.base_url.rsplit(":", 1)[1]
    async with running_service(settings):
        body = request(url.format(port=port))
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
    assert done["error"]["code"] == "image_url_forbidden", done["error"]


async def test_exif_rotated_photo_comes_out_upright(settings, channel, topology, events, photos):
    """A landscape JPEG with EXIF orientation 6 is processed as the portrait it shows."""
    async with running_service(settings) as running:
        body = request(photos.url("photos/rotated.jpg"))
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
        assert done["event"] == "completed", done
        path = done["output_image_url"].removeprefix("http://outputs.test")
        async with aiohttp.ClientSession() as http, http.get(running.sidecar + path) as resp:
            image = Image.open(io.BytesIO(await resp.read()))
    assert image.size == (480, 640)


async def test_service_keeps_running_after_failures(settings, channel, topology, events, photos):
    """After a failed task the next good one still completes."""
    async with running_service(settings):
        bad = request(photos.url("photos/missing.jpg"))
        good = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", bad)
        await publish(channel, topology, "transform", good)
        assert (await events.terminal(bad["task_id"]))["event"] == "failed"
        assert (await events.terminal(good["task_id"]))["event"] == "completed"
