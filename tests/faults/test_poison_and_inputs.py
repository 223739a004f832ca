"""Poison messages and hostile inputs against a live replica (issue 5, scenarios 10 and 11).

Poison never reaches a ComfyUI instance: it is dead-lettered (by the service with its
reason, or by the broker once the queue's delivery limit is spent) while good tasks in the
same run complete. Bad image URLs are accepted tasks that end `failed` with their exact
error code; they come from a hostile host on 127.0.0.2, the only host the replicas trust,
so loopback redirects, `localhost` and `[::1]` are refused as they would be in production.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from consumer.state import task_key
from consumer.testing.comfyui_emulator import Faults
from tests.broker.ctl import wait_until
from tests.e2e.harness import bomb_png, jpeg_bytes
from tests.faults.harness import FaultRun
from tests.faults.harness_photos import tiny_jpeg

STEADY = Faults(step_seconds=0.01)
EVENT_TIMEOUT_S = 30.0
POISON_INDEX = 900_000  # task ids of poison bodies, apart from the load's
EIGHT_MIB = 8 * 1024 * 1024
HOSTILE_HOST = "127.0.0.2"  # a loopback address of its own, the one the replicas allow
STREAM_CHUNK = b"\xff" * 65536
DRIP_INTERVAL_S = 0.5  # the slow-loris server's pace: one byte per interval
CRASH_LOG = "intake crashed on a message; requeued (the delivery limit applies)"


class HostileHost:
    """Serves a good photo and every kind of bad one, from 127.0.0.2."""

    def __init__(self, loopback_photo_url: str) -> None:
        photo = jpeg_bytes()
        self.files = {
            "photo.jpg": tiny_jpeg(),
            "not-image.txt": b"hello, this is not an image",
            "truncated.jpg": photo[: len(photo) // 2],
            "bomb.png": bomb_png(),
        }
        self.redirects = {
            "to-loopback.jpg": loopback_photo_url,
            "to-metadata.jpg": "http://169.254.169.254/latest/meta-data/",
        }
        self.base_url = ""

    def url(self, name: str) -> str:
        return f"{self.base_url}/{name}"

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/slow-loris.jpg", self.slow_loris)
        app.router.add_get("/endless.jpg", self.endless)
        app.router.add_get("/{name}", self.serve)
        return app

    async def serve(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name in self.redirects:
            raise web.HTTPFound(self.redirects[name])
        if name not in self.files:
            raise web.HTTPNotFound
        return web.Response(body=self.files[name], content_type="image/jpeg")

    async def slow_loris(self, request: web.Request) -> web.StreamResponse:
        """Headers at once, then one byte per DRIP_INTERVAL_S for as long as the client stays."""
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gave up: the point
            while True:
                await response.write(b"\xff")
                await asyncio.sleep(DRIP_INTERVAL_S)  # the fault itself, not a synchronisation
        return response

    async def endless(self, request: web.Request) -> web.StreamResponse:
        """A body without a length that never ends."""
        response = web.StreamResponse(headers={"Content-Type": "image/jpeg"})
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client gave up: the point
            while True:
                await response.write(STREAM_CHUNK)
        return response


@asynccontextmanager
async def hostile_host(loopback_photo_url: str) -> AsyncIterator[HostileHost]:
    host = HostileHost(loopback_photo_url)
    runner = web.AppRunner(host.app(), access_log=None, shutdown_timeout=1)
    await runner.setup()
    await web.TCPSite(runner, HOSTILE_HOST, 0).start()
    host.base_url = f"http://{HOSTILE_HOST}:{runner.addresses[0][1]}"
    try:
        yield host
    finally:
        await runner.cleanup()


async def wait_dead_letters(run: FaultRun, count: int) -> None:
    """Until `<prefix>.dead` holds `count` messages (the broker has no push for this)."""

    async def enough() -> bool:
        return await run.queue_depth(run.topology.dead) >= count

    await wait_until(enough, EVENT_TIMEOUT_S)


async def peek_dead_letter_headers(run: FaultRun, body: bytes) -> dict[str, Any]:
    """The headers of the dead letter carrying `body`; every dead letter stays queued."""
    queue = await run.channel.declare_queue(run.topology.dead, passive=True)
    held = []
    try:
        while (message := await queue.get(no_ack=False, fail=False)) is not None:
            held.append(message)
        found = [m for m in held if m.body == body]
        assert found, f"no dead letter carries {body[:80]!r}"
        return dict(found[0].headers or {})
    finally:
        for message in held:
            await message.nack(requeue=True)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def death_reasons(headers: dict[str, Any]) -> list[str]:
    """The `reason` of every x-death entry the broker added."""
    deaths = headers.get("x-death") or []
    return [_text(death.get("reason")) for death in deaths]


async def corrupt_record(run: FaultRun, task_id: str) -> None:
    """A stored record that no longer parses: reading it raises on every delivery."""
    key = task_key(run.owner(task_id), task_id)
    await run.redis.set(f"{run.redis_prefix}task:{key}", '{"task_id": "truncated')


def events_for(run: FaultRun, task_id: str) -> list[dict[str, Any]]:
    return [e for e in run.events.events if e.get("task_id") == task_id]


async def test_poison_is_dead_lettered_while_good_tasks_complete(fault_run):
    """Invalid JSON, a wrong content type, unknown fields, no user_id, 8 MiB and a message
    that crashes processing every time: all dead-lettered, none loops, good tasks complete."""
    async with fault_run("10. poison messages", faults=STEADY) as run:
        (replica,) = await run.spawn(1)
        await run.publish_tasks(15)
        unknown = run.request(POISON_INDEX + 1, colour="blue")
        wrong_type = run.request(POISON_INDEX + 2)
        anonymous = run.request(POISON_INDEX + 3)
        del anonymous["user_id"]
        crashing = run.request(POISON_INDEX + 4)
        await corrupt_record(run, crashing["task_id"])
        crashing_body = orjson.dumps(crashing)
        await run.publish(b'{"task_id": "not json', poison=True)
        await run.publish(orjson.dumps(wrong_type), poison=True, content_type="text/plain")
        await run.publish(orjson.dumps(unknown), poison=True)
        await run.publish(orjson.dumps(anonymous), poison=True)
        await run.publish(b'{"pad": "' + b"x" * EIGHT_MIB + b'"}', poison=True)
        await run.publish(crashing_body, poison=True)
        await run.publish_tasks(15)
        await wait_dead_letters(run, len(run.poison))
        headers = await peek_dead_letter_headers(run, crashing_body)
        crashes = len(replica.lines(CRASH_LOG))
        run.notes.append(f"crashing message delivered {crashes} times, then dead-lettered")
        failed_unknown = await run.events.wait_for(
            lambda e: e.get("task_id") == unknown["task_id"], EVENT_TIMEOUT_S
        )
        failed_type = await run.events.wait_for(
            lambda e: e.get("task_id") == wrong_type["task_id"], EVENT_TIMEOUT_S
        )
        row = await run.finish()
    assert death_reasons(headers) == ["delivery_limit"], headers
    assert 1 < crashes <= run.config.delivery_limit + 1
    assert failed_unknown["event"] == "failed"
    assert failed_unknown["error"]["code"] == "invalid_request"
    assert "colour" in failed_unknown["error"]["message"]
    assert failed_type["error"]["code"] == "invalid_request"
    assert "content_type" in failed_type["error"]["message"]
    assert not events_for(run, anonymous["task_id"]), "no user_id: nobody to tell"
    assert {e["event"] for t in run.task_ids for e in run.events.terminal[t]} == {"completed"}
    assert row.duplicates == 0


BAD_INPUTS = {
    "missing.jpg": "image_download_failed",  # 404
    "slow-loris.jpg": "image_download_failed",  # past IMAGE_TOTAL_TIMEOUT_S
    "endless.jpg": "image_too_large",  # past IMAGE_MAX_BYTES
    "not-image.txt": "image_invalid",
    "truncated.jpg": "image_invalid",
    "bomb.png": "image_too_large",
    "to-loopback.jpg": "image_url_forbidden",  # redirect to 127.0.0.1
    "to-metadata.jpg": "image_url_forbidden",  # redirect to 169.254.169.254
}
BAD_INPUT_ENV = {
    "IMAGE_URL_ALLOWED_HOSTS": HOSTILE_HOST,
    "IMAGE_TOTAL_TIMEOUT_S": "2",
    "IMAGE_MAX_BYTES": str(256 * 1024),
}


async def test_bad_inputs_fail_with_their_code_while_good_tasks_complete(fault_run):
    """404, slow-loris, endless body, non-image, truncated JPEG, bomb, redirects to loopback
    and metadata, [::1] and localhost: each fails with its code; good tasks complete."""
    async with fault_run("11. bad inputs", faults=STEADY, env=BAD_INPUT_ENV) as run:
        port = run.photos.base_url.rsplit(":", 1)[1]
        async with hostile_host(run.photos.url("photo.jpg")) as host:
            expected = {host.url(name): code for name, code in BAD_INPUTS.items()}
            expected[f"http://[::1]:{port}/photo.jpg"] = "image_url_forbidden"
            expected[f"http://localhost:{port}/photo.jpg"] = "image_url_forbidden"
            await run.spawn(1)
            good = await run.publish_tasks(10, image_url=host.url("photo.jpg"))
            bad = {(await run.publish_tasks(1, image_url=url))[0]: url for url in expected}
            good += await run.publish_tasks(10, image_url=host.url("photo.jpg"))
            row = await run.finish()
    outcomes = {bad[t]: _outcome(run, t) for t in bad}
    assert outcomes == {url: ("failed", code) for url, code in expected.items()}
    assert {_outcome(run, t) for t in good} == {("completed", None)}
    assert row.duplicates == 0
    assert run.photos.hits.get("photo.jpg", 0) == 0, "a refused URL was fetched anyway"


def _outcome(run: FaultRun, task_id: str) -> tuple[str, str | None]:
    (event,) = run.events.terminal[task_id]
    return event["event"], (event["error"] or {}).get("code")
