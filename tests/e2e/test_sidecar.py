"""The sidecar: health, readiness, stats, task lookup with its token, metrics, bad requests.

The token and malformed-request tests run the real sidecar on port 0 over a fake service
view and a memory store (no broker); the others run a whole replica (connected).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from consumer.sidecar import Sidecar, SidecarDeps
from consumer.state import MemoryTaskStore, TaskRecord
from tests.e2e.harness import publish, request, running_service

TOKEN = "s3cret"
HTTP_TIMEOUT_S = 5.0
PROTECTED = ["/api/v1/task/t1", "/api/v1/user/alice/tasks", "/api/v1/stats"]
OPEN = ["/healthz", "/readyz", "/health", "/metrics"]


async def _get(url: str, token: str | None = None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
        body = await resp.json() if resp.content_type == "application/json" else await resp.text()
        return resp.status, body


@pytest.mark.connected
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

        assert (await _get(base + "/api/v1/stats"))[0] == 401
        status, stats = await _get(base + "/api/v1/stats", "s3cret")
        assert stats["tasks"]["by_status"]["completed"] == 1
        assert stats["tasks"]["by_style"] == {"clay": 1}


@pytest.mark.connected
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


async def _wait_not_ready(running: Any) -> tuple[int, Any]:
    pool = running.service._pool
    async with asyncio.timeout(20):
        while pool.healthy_capacity() > 0:
            await pool.capacity_changed()
    return await _get(running.sidecar + "/readyz")


@pytest.mark.connected
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


class FakeView:
    """A service that is ready and healthy, with fixed stats."""

    async def readiness(self) -> dict[str, str | None]:
        return {"broker": None}

    def health(self) -> dict[str, Any]:
        return {"status": "healthy"}

    async def stats(self) -> dict[str, Any]:
        return {"tasks": {}}


@asynccontextmanager
async def sidecar(token: str | None) -> AsyncIterator[int]:
    """A real sidecar on a free loopback port over a fake view; yields the port."""
    store = MemoryTaskStore(ttl_s=60)
    await store.create(TaskRecord(task_id="t1", user_id="alice", style_type="clay"))
    await store.create(TaskRecord(task_id="shared", user_id="alice", style_type="clay"))
    await store.create(TaskRecord(task_id="shared", user_id="bob", style_type="anime"))
    deps = SidecarDeps(FakeView(), store, CollectorRegistry(), token=token)
    async with Sidecar(deps, "127.0.0.1", 0) as running:
        yield running.port


async def _raw_status(port: int, head: bytes) -> int:
    """The status code the sidecar answers to `head`, sent as raw bytes on a fresh socket."""
    async with asyncio.timeout(HTTP_TIMEOUT_S):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(head)
            with suppress(ConnectionError):  # it may answer and close before reading it all
                await writer.drain()
            status_line = await reader.readline()
        finally:
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
    return int(status_line.split()[1])


def _get_head(path: bytes, *headers: bytes, host: bytes = b"127.0.0.1") -> bytes:
    lines = [b"GET " + path + b" HTTP/1.1", b"Host: " + host, *headers, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


AUTH = b"Authorization: Bearer " + TOKEN.encode()


async def test_task_endpoints_and_stats_need_the_token_when_one_is_set() -> None:
    """With a token, task lookups and stats answer 401 without it or with a wrong one."""
    async with sidecar(TOKEN) as port:
        base = f"http://127.0.0.1:{port}"
        for path in PROTECTED:
            assert (await _get(base + path))[0] == 401, path
            assert (await _get(base + path, "wrong"))[0] == 401, path
            assert (await _get(base + path, TOKEN))[0] == 200, path


async def test_a_task_id_two_users_share_needs_its_owner() -> None:
    """Task ids are per user: an id two users have answers 409 until ?user_id= picks one."""
    async with sidecar(None) as port:
        base = f"http://127.0.0.1:{port}/api/v1/task"
        status, body = await _get(f"{base}/shared")
        assert (status, body["error"]["code"]) == (409, "ambiguous")
        status, task = await _get(f"{base}/shared?user_id=bob")
        assert (status, task["user_id"], task["style_type"]) == (200, "bob", "anime")
        assert (await _get(f"{base}/shared?user_id=carol"))[0] == 404
        assert (await _get(f"{base}/shared?user_id=no.dots"))[0] == 400
        status, task = await _get(f"{base}/t1")
        assert (status, task["user_id"]) == (200, "alice")


async def test_health_metrics_and_outputs_never_need_the_token() -> None:
    """Probes and the Prometheus scrape stay open; outputs are public (404 when absent)."""
    async with sidecar(TOKEN) as port:
        base = f"http://127.0.0.1:{port}"
        for path in OPEN:
            assert (await _get(base + path))[0] == 200, path
        assert (await _get(base + "/outputs/abc/x.png"))[0] == 404


async def test_the_bearer_scheme_is_case_insensitive() -> None:
    """`bearer <token>` is as good as `Bearer <token>` (RFC 7235 schemes ignore case)."""
    async with sidecar(TOKEN) as port:
        head = _get_head(b"/api/v1/stats", b"Authorization: bearer " + TOKEN.encode())
        assert await _raw_status(port, head) == 200


async def test_without_a_token_everything_is_open() -> None:
    """A sidecar without a token (loopback only) answers task endpoints unauthenticated."""
    async with sidecar(None) as port:
        for path in PROTECTED:
            assert (await _get(f"http://127.0.0.1:{port}{path}"))[0] == 200, path


@pytest.mark.parametrize(
    "authorization",
    [
        b"Authorization: Bearer \xff\xfe",
        b"Authorization: \xff",
        b"Authorization: Bearer " + TOKEN.encode() + b"\xff",
        b"Authorization: Bearer",
        b"Authorization: ",
        b"Authorization: Basic czNjcmV0",
    ],
)
async def test_a_malformed_authorization_header_is_refused_not_an_error(
    authorization: bytes,
) -> None:
    """Bytes that are not UTF-8, a wrong scheme or no credentials answer 401, never 500."""
    async with sidecar(TOKEN) as port:
        for path in PROTECTED:
            assert await _raw_status(port, _get_head(path.encode(), authorization)) == 401, path


@pytest.mark.parametrize(
    ("head", "expected"),
    [
        # Host is never used: a bad one changes nothing
        (_get_head(b"/api/v1/task/t1", host=b"\xff\xfe"), 401),
        (_get_head(b"/api/v1/task/t1", AUTH, host=b"\xff\xfe"), 200),
        (_get_head(b"/api/v1/task/t1", AUTH, host=b"bad host:port:x"), 200),
        (_get_head(b"/api/v1/task/t1", AUTH, b"X-Big: " + b"a" * 20_000), 400),
        (_get_head(b"/api/v1/task/t1", AUTH, b"X-Bad: \xff\x00"), 400),
        (_get_head(b"/api/v1/task/%zz", AUTH), 404),
        (_get_head(b"/api/v1/task/%ff%fe", AUTH), 404),
        (_get_head(b"/api/v1/task/\xff", AUTH), 400),
        (_get_head(b"/api/v1/task/t1%00", AUTH), 404),
        (_get_head(b"/api/v1/user/%ff/tasks", AUTH), 400),
        (_get_head(b"/api/v1/user/alice/tasks?limit=abc", AUTH), 400),
        (_get_head(b"/api/v1/user/alice/tasks?limit=%ff", AUTH), 400),
        (_get_head(b"/api/v1/user/alice/tasks?limit=1e3", AUTH), 400),
        (_get_head(b"/api/v1/user/alice/tasks?limit=-1", AUTH), 400),
        (_get_head(b"/api/v1/user/alice/tasks?limit=" + b"9" * 5000, AUTH), 400),
        (_get_head(b"/outputs/%ff/..%2f..%2fetc%2fpasswd"), 404),
        (_get_head(b"/outputs/\xff\xfe/x.png"), 400),
        (b"GARBAGE\r\n\r\n", 400),
        (b"GET /healthz HTTP/9.9\r\n\r\n", 400),
    ],
)
async def test_malformed_requests_answer_4xx_never_500(head: bytes, expected: int) -> None:
    """Bad Host, huge or binary headers, bad escapes in the path and bad limits: never a 500."""
    async with sidecar(TOKEN) as port:
        assert await _raw_status(port, head) == expected
