"""S3OutputStore through the real client against moto's S3 on loopback."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from urllib.parse import urlsplit

import obstore
import pytest
from PIL import Image

from consumer.errors import OutputUploadFailed
from consumer.object_store import S3OutputConfig, S3OutputStore, bucket_endpoint
from consumer.storage import OutputStore

from .conftest import ACCESS_KEY_ID, SECRET_ACCESS_KEY, FlakyProxy

KEY = re.compile(r"(?P<prefix>.*?)(?P<token>[0-9a-f]{32})/(?P<name>[A-Za-z0-9._-]+)")


def png_bytes(side: int = 256) -> bytes:
    """A real PNG, with some entropy so it does not compress to nothing."""
    image = Image.effect_noise((side, side), 64).convert("RGB")
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def key_of(url: str, bucket: str) -> str:
    """The object key in a path-style URL."""
    path = urlsplit(url).path
    assert path.startswith(f"/{bucket}/"), url
    return path.removeprefix(f"/{bucket}/")


async def make_public(http, bucket_url: str) -> None:
    """A bucket policy that lets anyone GET objects: what a public bucket or CDN origin has."""
    bucket = bucket_url.rsplit("/", 1)[1]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": "*",
                "Action": "s3:GetObject",
                "Resource": f"arn:aws:s3:::{bucket}/*",
            }
        ],
    }
    async with http.put(f"{bucket_url}?policy", data=json.dumps(policy)) as response:
        assert response.status in {200, 204}, await response.text()


def keys(store: S3OutputStore) -> set[str]:
    """Every key in the store's bucket."""
    return {meta["path"] for batch in obstore.list(store._s3) for meta in batch}


async def test_save_returns_a_presigned_url_that_serves_the_exact_bytes(
    s3_config, open_store, http
):
    """A plain GET of the event's URL returns the stored bytes and their content type."""
    store = open_store(s3_config)
    data = png_bytes()
    url = await store.save("task-1", "styled_00001_.png", data, "image/png")
    assert "X-Amz-Signature=" in url
    assert "X-Amz-Expires=604800" in url
    async with http.get(url) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "image/png"
        assert await response.read() == data


async def test_keys_are_fresh_random_tokens_and_never_name_the_task(s3_config, open_store):
    """Two saves of one file get two 128-bit tokens; the key holds no task id, a safe name."""
    store = open_store(s3_config)
    first = await store.save("task-42", "../../etc/out.png", b"\x89PNG a", "image/png")
    second = await store.save("task-42", "../../etc/out.png", b"\x89PNG b", "image/png")
    first_key, second_key = key_of(first, s3_config.bucket), key_of(second, s3_config.bucket)
    assert first_key != second_key
    assert "task-42" not in first
    match = KEY.fullmatch(first_key)
    assert match
    assert (match["prefix"], match["name"]) == ("", "out.png")


def test_store_satisfies_the_protocol(s3_config, open_store):
    """S3OutputStore is an OutputStore (save and cleanup)."""
    implementation: OutputStore = open_store(s3_config)
    assert implementation.cleanup


async def test_keys_start_with_the_prefix(s3_config, open_store):
    """OUTPUT_S3_PREFIX is the start of every key."""
    store = open_store(s3_config, prefix="outputs/v1/")
    url = await store.save("t", "a.webp", b"RIFF....WEBP", "image/webp")
    key = key_of(url, s3_config.bucket)
    match = KEY.fullmatch(key)
    assert match
    assert (match["prefix"], match["name"]) == ("outputs/v1/", "a.webp")
    assert keys(store) == {key}


async def test_public_base_url_mode_gives_unsigned_urls(s3_config, s3_endpoint, open_store, http):
    """With a public base URL the event carries `{base}/{key}`, which serves the bytes."""
    base = f"{s3_endpoint}/{s3_config.bucket}"
    await make_public(http, base)
    store = open_store(s3_config, public_base_url=base, prefix="p/")
    data = png_bytes(64)
    url = await store.save("t", "x.png", data, "image/png")
    assert url.startswith(f"{base}/p/")
    assert "?" not in url
    async with http.get(url) as response:
        assert response.status == 200
        assert await response.read() == data


def test_virtual_hosted_addressing_puts_the_bucket_in_the_host(open_store):
    """Without path style, a custom endpoint gets the bucket as a subdomain (OSS, R2)."""
    config = S3OutputConfig(
        bucket="pics",
        endpoint_url="https://oss-cn-hangzhou.aliyuncs.com",
        access_key_id=ACCESS_KEY_ID,
        secret_access_key=SECRET_ACCESS_KEY,
    )
    assert bucket_endpoint(config.endpoint_url or "", "pics") == (
        "https://pics.oss-cn-hangzhou.aliyuncs.com"
    )
    virtual = open_store(config)._url("k/x.png")
    path_style = open_store(config, force_path_style=True)._url("k/x.png")
    assert virtual.startswith("https://pics.oss-cn-hangzhou.aliyuncs.com/k/x.png?")
    assert path_style.startswith("https://oss-cn-hangzhou.aliyuncs.com/pics/k/x.png?")


@pytest.mark.parametrize(("status", "code"), [(503, "SlowDown"), (500, "InternalError")])
async def test_server_errors_are_retried_with_the_same_bytes(
    s3_config, open_store, flaky: FlakyProxy, http, status, code
):
    """Two 5xx answers, then success: three PUTs of identical bytes, one stored object."""
    flaky.failures, flaky.status, flaky.code = 2, status, code
    store = open_store(s3_config, endpoint_url=flaky.url, max_retries=3)
    data = png_bytes(128)
    url = await store.save("t", "x.png", data, "image/png")
    assert flaky.puts == 3
    assert flaky.bodies == [data] * 3
    async with http.get(url) as response:
        assert await response.read() == data


async def test_throttling_429_is_retried(s3_config, open_store, flaky: FlakyProxy):
    """429 Too Many Requests (some S3-compatible stores throttle so) is retried too."""
    flaky.failures, flaky.status, flaky.code = 1, 429, "TooManyRequests"
    store = open_store(s3_config, endpoint_url=flaky.url)
    await store.save("t", "x.png", b"\x89PNG", "image/png")
    assert flaky.puts == 2


async def test_exhausted_retries_fail_without_leaking_secrets(
    s3_config, open_store, flaky: FlakyProxy
):
    """Past max_retries: OutputUploadFailed naming status and code, and no key or signature."""
    flaky.failures = 10
    store = open_store(s3_config, endpoint_url=flaky.url, max_retries=2)
    with pytest.raises(OutputUploadFailed) as caught:
        await store.save("t", "x.png", b"\x89PNG", "image/png")
    message = caught.value.message
    assert caught.value.code == "output_upload_failed"
    assert "HTTP 503 SlowDown after 2 retries" in message
    assert flaky.puts == 3
    for secret in (ACCESS_KEY_ID, SECRET_ACCESS_KEY, "Signature", "AWS4-HMAC-SHA256"):
        assert secret not in message
        assert secret not in repr(caught.value)


async def test_client_errors_are_not_retried(s3_config, open_store, flaky: FlakyProxy):
    """A 403 AccessDenied fails at once: one PUT, the code in the message."""
    flaky.failures, flaky.status, flaky.code = 5, 403, "AccessDenied"
    store = open_store(s3_config, endpoint_url=flaky.url)
    with pytest.raises(OutputUploadFailed, match="HTTP 403 AccessDenied"):
        await store.save("t", "x.png", b"\x89PNG", "image/png")
    assert flaky.puts == 1


async def test_a_missing_bucket_fails_the_upload(s3_config, open_store):
    """NoSuchBucket is an upload failure, not a crash."""
    store = open_store(s3_config, bucket="no-such-bucket-here")
    with pytest.raises(OutputUploadFailed, match="NoSuchBucket"):
        await store.save("t", "x.png", b"\x89PNG", "image/png")


async def test_cleanup_deletes_only_old_objects_of_ours_under_the_prefix(s3_config, open_store):
    """Fresh objects stay; old ones of our key shape under the prefix go, nothing else does."""
    later_s = time.time() + 7200.0
    store = open_store(s3_config, prefix="out/")
    future = open_store(s3_config, prefix="out/", clock=lambda: later_s)
    other = open_store(s3_config, prefix="elsewhere/")
    ours = {
        key_of(await store.save("t", f"{i}.png", b"x", "image/png"), store.config.bucket)
        for i in range(3)
    }
    outside = key_of(await other.save("t", "keep.png", b"x", "image/png"), store.config.bucket)
    foreign = "out/notes.txt"
    obstore.put(store._s3, foreign, b"not an output")

    assert await store.cleanup(3600.0) == 0  # nothing is an hour old yet
    assert keys(store) == {*ours, outside, foreign}
    assert await future.cleanup(3600.0) == 3  # two hours on, ours under out/ expire
    assert keys(store) == {outside, foreign}


async def test_cleanup_can_be_left_to_a_lifecycle_rule(s3_config, open_store):
    """With the sweep off, cleanup deletes nothing."""
    store = open_store(s3_config, sweep=False, clock=lambda: time.time() + 7200.0)
    await store.save("t", "x.png", b"x", "image/png")
    assert await store.cleanup(60.0) == 0
    assert len(keys(store)) == 1


async def test_a_failed_sweep_is_logged_not_raised(s3_config, open_store, caplog):
    """The cleanup loop must survive an unreachable bucket: 0 removed, one safe warning."""
    store = open_store(s3_config, bucket="no-such-bucket-here")
    with caplog.at_level(logging.WARNING, logger="consumer.object_store"):
        assert await store.cleanup(60.0) == 0
    assert "sweeping s3://no-such-bucket-here/ failed: HTTP 404 NoSuchBucket" in caplog.text
    assert ACCESS_KEY_ID not in caplog.text


async def test_repr_shows_where_not_credentials(s3_config, open_store):
    """The store's and its config's repr name the bucket, never the keys."""
    store = open_store(s3_config, prefix="p/")
    await store.save("t", "x.png", b"x", "image/png")
    assert repr(store) == f"<S3OutputStore 's3://{s3_config.bucket}/p/' saved=1>"
    assert SECRET_ACCESS_KEY not in repr(store.config)
    assert ACCESS_KEY_ID not in repr(store.config)


async def test_a_closed_store_refuses_to_save(s3_config):
    """After close the client is dropped: saving fails as an upload failure."""
    async with S3OutputStore(s3_config, max_workers=1) as store:
        await store.save("t", "x.png", b"x", "image/png")
    with pytest.raises(OutputUploadFailed, match="closed"):
        await store.save("t", "x.png", b"x", "image/png")
