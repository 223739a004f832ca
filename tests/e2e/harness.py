"""Test harness for the service end to end: a photo host, an event subscriber, a running replica."""

from __future__ import annotations

import asyncio
import io
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from PIL import Image

from consumer.app import Service
from consumer.settings import Settings
from consumer.topology import Topology

WAIT_S = 30.0


def jpeg_bytes(width: int = 640, height: int = 480, orientation: int | None = None) -> bytes:
    """A synthetic photo: a gradient with a marker in the top-left corner."""
    image = Image.new("RGB", (width, height))
    pixels = [
        (x * 255 // width, y * 255 // height, 128) for y in range(height) for x in range(width)
    ]
    image.putdata(pixels)
    image.paste((255, 0, 0), (0, 0, width // 8, height // 8))
    out = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    image.save(out, "JPEG", quality=85, exif=exif)
    return out.getvalue()


def bomb_png() -> bytes:
    """A small PNG that claims a huge canvas (a decompression bomb)."""
    out = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(out, "PNG")
    return out.getvalue()


@dataclass
class PhotoHost:
    """A loopback HTTP server with the photos and failures the tests need."""

    base_url: str = ""
    uploads: dict[str, bytes] = field(default_factory=dict)
    uploaded: asyncio.Event = field(default_factory=asyncio.Event)
    slow_requested: asyncio.Event = field(default_factory=asyncio.Event)
    slow_release: asyncio.Event = field(default_factory=asyncio.Event)

    def url(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def app(self) -> web.Application:
        photo = jpeg_bytes()
        files = {
            "photo.jpg": photo,
            "rotated.jpg": jpeg_bytes(640, 480, orientation=6),
            "truncated.jpg": photo[: len(photo) // 2],
            "bomb.png": bomb_png(),
            "not-image.txt": b"hello, this is not an image",
        }

        async def serve(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            if name not in files:
                raise web.HTTPNotFound
            return web.Response(body=files[name])

        async def upload(request: web.Request) -> web.Response:
            self.uploads[request.match_info["name"]] = await request.read()
            self.uploaded.set()
            return web.Response(status=200)

        async def slow(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse()
            await response.prepare(request)
            self.slow_requested.set()
            await self.slow_release.wait()
            return response

        app = web.Application()
        app.router.add_get("/slow/photo.jpg", slow)
        app.router.add_get("/photos/{name}", serve)
        app.router.add_put("/upload/{name}", upload)
        return app


@asynccontextmanager
async def photo_host() -> AsyncIterator[PhotoHost]:
    host = PhotoHost()
    runner = web.AppRunner(host.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    host.base_url = f"http://127.0.0.1:{port}"
    try:
        yield host
    finally:
        host.slow_release.set()
        await runner.cleanup()


class EventLog:
    """Everything published on the events exchange, in arrival order, with waiting helpers."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.messages: list[AbstractIncomingMessage] = []
        self._changed = asyncio.Condition()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        async with message.process(), self._changed:
            self.events.append(orjson.loads(message.body))
            self.messages.append(message)
            self._changed.notify_all()

    async def wait_for(
        self, predicate: Callable[[dict[str, Any]], bool], timeout_s: float = WAIT_S
    ) -> dict[str, Any]:
        """The first event matching `predicate`, waiting for it if needed."""
        async with asyncio.timeout(timeout_s), self._changed:
            while True:
                for event in self.events:
                    if predicate(event):
                        return event
                await self._changed.wait()

    async def terminal(self, task_id: str, timeout_s: float = WAIT_S) -> dict[str, Any]:
        return await self.wait_for(
            lambda e: (
                e.get("task_id") == task_id and e["event"] in {"completed", "failed", "cancelled"}
            ),
            timeout_s,
        )

    def of(self, task_id: str) -> list[str]:
        return [e["event"] for e in self.events if e.get("task_id") == task_id]


@asynccontextmanager
async def subscribe(
    channel: AbstractChannel, topology: Topology, key: str = "#"
) -> AsyncIterator[EventLog]:
    """An independent subscriber bound to the events exchange."""
    log = EventLog()
    exchange = await channel.get_exchange(topology.events)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, key)
    tag = await queue.consume(log.on_message)
    try:
        yield log
    finally:
        await queue.cancel(tag)


async def publish(
    channel: AbstractChannel,
    topology: Topology,
    routing_key: str,
    body: dict[str, Any] | bytes,
    **properties: Any,
) -> None:
    """Publish a request as an app backend would."""
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    properties.setdefault("content_type", "application/json")
    properties.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
    exchange = await channel.get_exchange(topology.requests)
    await exchange.publish(aio_pika.Message(raw, **properties), routing_key)


def request(photo_url: str, style: str = "clay", **fields: Any) -> dict[str, Any]:
    body = {
        "task_id": f"t-{uuid.uuid4().hex[:12]}",
        "user_id": "user_1",
        "image_url": photo_url,
        "style_type": style,
    }
    body.update(fields)
    return body


@dataclass
class Running:
    service: Service
    stop: asyncio.Event
    task: asyncio.Task[None]

    @property
    def sidecar(self) -> str:
        return f"http://127.0.0.1:{self.service.sidecar_port}"


@asynccontextmanager
async def running_service(settings: Settings, **options: Any) -> AsyncIterator[Running]:
    """A replica running in this event loop until the block ends (then a clean shutdown);
    `options` go to `Service` (e.g. `tracer_provider`)."""
    service = Service(settings, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        async with asyncio.timeout(WAIT_S):
            ready = asyncio.create_task(service.ready.wait())
            done, _ = await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                ready.cancel()
                task.result()
        yield Running(service, stop, task)
    finally:
        stop.set()
        async with asyncio.timeout(WAIT_S):
            await asyncio.gather(task, return_exceptions=True)


async def delete_topology(channel: AbstractChannel, topology: Topology) -> None:
    for spec in topology.queues():
        await channel.queue_delete(spec.name)
    for exchange in topology.exchanges():
        await channel.exchange_delete(exchange.name)
