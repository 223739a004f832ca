"""Poison messages: a `failed` event when a user_id can be read, then the dead-letter queue."""

from __future__ import annotations

import asyncio

import aiohttp
import orjson
import pytest

from tests.e2e.harness import WAIT_S, publish, request, running_service

pytestmark = pytest.mark.connected


async def _dead_letters(channel, topology, count):
    queue = await channel.get_queue(topology.dead)
    found = []
    async with asyncio.timeout(WAIT_S), queue.iterator() as messages:
        async for message in messages:
            await message.ack()
            found.append(message)
            if len(found) == count:
                return found
    return found


async def test_invalid_json_is_dead_lettered_with_its_reason(settings, channel, topology, events):
    """Bytes that are not JSON go to style.dead with x-error-code invalid_request."""
    async with running_service(settings):
        await publish(channel, topology, "transform", b"{not json")
        (dead,) = await _dead_letters(channel, topology, 1)
    assert dead.body == b"{not json"
    assert dead.headers["x-error-code"] == "invalid_request"
    assert "JSON" in dead.headers["x-error-message"]


async def test_schema_errors_fail_for_the_user_and_are_dead_lettered(
    settings, channel, topology, events, photos
):
    """Unknown fields and styles get a failed event (user_id is readable) and a dead letter."""
    typo = request(photos.url("photos/photo.jpg"), colour="blue")
    unknown = request(photos.url("photos/photo.jpg"), "vaporwave")
    async with running_service(settings) as running:
        await publish(channel, topology, "transform", typo)
        await publish(channel, topology, "transform", unknown)
        failed_typo = await events.terminal(typo["task_id"])
        failed_style = await events.terminal(unknown["task_id"])
        dead = await _dead_letters(channel, topology, 2)
        url = f"{running.sidecar}/api/v1/task/{typo['task_id']}"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            looked_up = await resp.json()
    assert looked_up["status"] == "failed"
    assert looked_up["error"]["code"] == "invalid_request"
    assert failed_typo["error"]["code"] == "invalid_request"
    assert "colour" in failed_typo["error"]["message"]
    assert failed_style["error"]["code"] == "unsupported_style"
    assert "vaporwave" in failed_style["error"]["message"]
    codes = sorted(m.headers["x-error-code"] for m in dead)
    assert codes == ["invalid_request", "unsupported_style"]


async def test_oversized_and_wrong_content_type_are_refused(
    make_settings, channel, topology, events, photos
):
    """Messages over MAX_MESSAGE_BYTES or with a non-JSON content type are dead-lettered."""
    settings = make_settings(max_message_bytes=4096)
    big = request(
        photos.url("photos/photo.jpg"), custom_prompt="x" * 1999, metadata={"a": "y" * 3000}
    )
    async with running_service(settings):
        await publish(channel, topology, "transform", big)
        await publish(
            channel, topology, "transform", orjson.dumps(request("x")), content_type="text/plain"
        )
        dead = await _dead_letters(channel, topology, 2)
    reasons = " | ".join(m.headers["x-error-message"] for m in dead)
    assert "limit is 4096" in reasons
    assert "content_type" in reasons


async def test_missing_user_id_is_dead_lettered_without_an_event(
    settings, channel, topology, events, photos
):
    """Without a readable user_id nobody can be told: the message is only dead-lettered."""
    body = request(photos.url("photos/photo.jpg"))
    del body["user_id"]
    async with running_service(settings):
        await publish(channel, topology, "transform", body)
        (dead,) = await _dead_letters(channel, topology, 1)
    assert "user_id" in dead.headers["x-error-message"]
    assert not [e for e in events.events if e.get("task_id") == body["task_id"]]
