"""Fixtures for end-to-end tests: emulated ComfyUI instances, a photo host, a broker channel."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aio_pika
import pytest
from aio_pika.abc import AbstractChannel

from consumer.settings import ComfyInstanceSettings, Settings, load_settings
from consumer.state import RedisTaskStore
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from consumer.topology import Topology
from tests.e2e.harness import EventLog, PhotoHost, delete_topology, photo_host, subscribe

pytestmark = pytest.mark.connected


@pytest.fixture
async def emulators() -> AsyncIterator[list[ComfyEmulator]]:
    """Two emulated ComfyUI instances with zero-time sampler steps."""
    started = [ComfyEmulator(Faults()) for _ in range(2)]
    for emulator in started:
        await emulator.start()
    yield started
    for emulator in started:
        await emulator.stop()


@pytest.fixture
async def photos() -> AsyncIterator[PhotoHost]:
    async with photo_host() as host:
        yield host


@pytest.fixture
def topology(prefix: str) -> Topology:
    return Topology(prefix)


@pytest.fixture
async def channel(amqp_url: str, topology: Topology) -> AsyncIterator[AbstractChannel]:
    """An app backend's channel; the test's topology is deleted afterwards."""
    async with await aio_pika.connect(amqp_url) as connection:
        yield await connection.channel()
        await delete_topology(await connection.channel(), topology)


@pytest.fixture
def make_settings(
    amqp_url: str, prefix: str, tmp_path: Path, emulators: list[ComfyEmulator]
) -> Callable[..., Settings]:
    """Settings for a replica on this test's topology and emulators; overrides by keyword."""

    def build(**overrides: Any) -> Settings:
        values: dict[str, Any] = {
            "amqp_url": amqp_url,
            "amqp_prefix": prefix,
            "comfyui_instances": [
                ComfyInstanceSettings(url=e.url, name=f"comfy-{i}", max_concurrency=2)
                for i, e in enumerate(emulators)
            ],
            "comfyui_health_interval_s": 0.2,
            "comfyui_outage_grace_s": 1.0,
            "image_url_allowed_hosts": ["127.0.0.1"],
            "output_dir": tmp_path / "outputs",
            "public_base_url": "http://outputs.test",
            "sidecar_host": "127.0.0.1",
            "sidecar_port": 0,
            "progress_interval_ms": 0,
            "retry_backoff_s": 0.01,
            "shutdown_grace_s": 5,
            "amqp_publish_timeout_s": 5,
        }
        values.update(overrides)
        return load_settings(**values)

    return build


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
async def events(
    channel: AbstractChannel, topology: Topology, settings: Settings
) -> AsyncIterator[EventLog]:
    """An independent subscriber to every event of this test's topology."""
    from consumer.topology import declare_topology

    await declare_topology(channel, topology)
    async with subscribe(channel, topology) as log:
        yield log


@pytest.fixture
async def redis_store(redis_url: str) -> AsyncIterator[RedisTaskStore]:
    """A Redis task store under a key prefix of its own, deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:8]}:"
    store = RedisTaskStore.from_url(redis_url, ttl_s=3600, key_prefix=prefix)
    yield store
    keys = [key async for key in store._redis.scan_iter(f"{prefix}*")]
    if keys:
        await store._redis.delete(*keys)
    await store.close()
