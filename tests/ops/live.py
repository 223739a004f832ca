"""A live replica for the ops checks: its own topology, two emulated ComfyUI instances, and
traffic that gives every labelled metric a child (add a case here when a metric needs one)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aio_pika
import aiohttp
from aio_pika.abc import AbstractChannel, AbstractConnection

from consumer.settings import ComfyInstanceSettings, Settings, load_settings
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from consumer.topology import Topology, declare_topology
from tests.e2e.harness import (
    EventLog,
    PhotoHost,
    Running,
    delete_topology,
    photo_host,
    publish,
    request,
    running_service,
    subscribe,
)
from tests.ops.waiting import until

WAIT_S = 20.0


@dataclass
class Live:
    """A running replica and an app backend's view of it."""

    running: Running
    channel: AbstractChannel
    topology: Topology
    events: EventLog
    photos: PhotoHost

    @property
    def target(self) -> str:
        """The replica's sidecar as a Prometheus target."""
        return f"127.0.0.1:{self.running.service.sidecar_port}"

    async def metrics_text(self) -> str:
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://{self.target}/metrics") as response,
        ):
            response.raise_for_status()
            return await response.text()

    async def complete(self, count: int) -> None:
        """Publish `count` requests and wait until each one completed."""
        bodies = [request(self.photos.url("photos/photo.jpg")) for _ in range(count)]
        for body in bodies:
            await publish(self.channel, self.topology, "transform", body)
        for body in bodies:
            assert (await self.events.terminal(body["task_id"]))["event"] == "completed"

    async def traffic(self) -> None:
        """A completed task, a failed one (image_download_failed) and a dead-lettered poison."""
        await self.complete(1)
        failing = request(self.photos.url("photos/missing.jpg"))
        await publish(self.channel, self.topology, "transform", failing)
        assert (await self.events.terminal(failing["task_id"]))["event"] == "failed"
        await publish(self.channel, self.topology, "transform", b"not json")
        await self.wait_for_line(
            'style_consumer_messages_dead_lettered_total{code="invalid_request"}'
        )

    async def wait_for_line(self, start: str) -> None:
        """Poll /metrics until a line starts with `start`."""

        async def present() -> bool:
            return any(line.startswith(start) for line in (await self.metrics_text()).splitlines())

        await until(present, WAIT_S)


@asynccontextmanager
async def live_replica(amqp_url: str, workdir: Path) -> AsyncIterator[Live]:
    """A replica on a fresh topology (deleted afterwards) with a subscriber to its events."""
    topology = Topology(f"t{uuid.uuid4().hex[:12]}")
    async with AsyncExitStack() as stack:
        emulators = [ComfyEmulator(Faults()) for _ in range(2)]
        for emulator in emulators:
            await emulator.start()
            stack.push_async_callback(emulator.stop)
        photos = await stack.enter_async_context(photo_host())
        connection = await stack.enter_async_context(await aio_pika.connect(amqp_url))
        stack.push_async_callback(_delete_topology, connection, topology)
        channel = await connection.channel()
        await declare_topology(channel, topology)
        events = await stack.enter_async_context(subscribe(channel, topology))
        settings = _settings(amqp_url, topology.prefix, workdir, emulators)
        running = await stack.enter_async_context(running_service(settings))
        yield Live(running, channel, topology, events, photos)


async def _delete_topology(connection: AbstractConnection, topology: Topology) -> None:
    await delete_topology(await connection.channel(), topology)


def _settings(
    amqp_url: str, prefix: str, workdir: Path, emulators: list[ComfyEmulator]
) -> Settings:
    return load_settings(
        amqp_url=amqp_url,
        amqp_prefix=prefix,
        comfyui_instances=[
            ComfyInstanceSettings(url=e.url, name=f"comfy-{i}", max_concurrency=2)
            for i, e in enumerate(emulators)
        ],
        comfyui_health_interval_s=0.2,
        image_url_allowed_hosts=["127.0.0.1"],
        output_dir=workdir / "outputs",
        public_base_url="http://outputs.test",
        sidecar_host="127.0.0.1",
        sidecar_port=0,
        progress_interval_ms=0,
        retry_backoff_s=0.01,
        shutdown_grace_s=5,
        amqp_publish_timeout_s=5,
    )
