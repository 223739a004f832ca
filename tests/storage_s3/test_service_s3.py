"""One task through a whole replica with OUTPUT_STORE=s3: the event's URL serves the image."""

from __future__ import annotations

import io
import re

import pytest
from PIL import Image

from tests.e2e.harness import publish, request, running_service

from .conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY

pytestmark = pytest.mark.connected


@pytest.fixture
def settings(make_settings, s3_endpoint, bucket):
    """The e2e replica's settings, storing outputs in this test's bucket under `e2e/`."""
    return make_settings(
        output_store="s3",
        output_s3_bucket=bucket,
        output_s3_endpoint_url=s3_endpoint,
        output_s3_force_path_style=True,
        output_s3_prefix="e2e",
        aws_access_key_id=ACCESS_KEY_ID,
        aws_secret_access_key=SECRET_ACCESS_KEY,
    )


async def test_completed_event_carries_a_presigned_url_to_the_image(
    settings, s3_endpoint, bucket, channel, topology, events, photos, http
):
    """The completed event's URL is a signed GET in the bucket that returns the styled PNG."""
    async with running_service(settings) as running:
        body = request(photos.url("photos/photo.jpg"))
        await publish(channel, topology, "transform", body)
        done = await events.terminal(body["task_id"])
        async with http.get(f"{running.sidecar}/outputs/{'0' * 32}/x.png") as local:
            assert local.status == 404  # the sidecar serves only the local store
    assert done["event"] == "completed", done
    url = done["output_image_url"]
    assert re.match(rf"{re.escape(s3_endpoint)}/{bucket}/e2e/[0-9a-f]{{32}}/[^/?]+\?", url), url
    assert "X-Amz-Signature=" in url
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        image = Image.open(io.BytesIO(await response.read()))
        assert (image.format, image.size) == ("PNG", (640, 480))
