"""What the end-to-end benchmarks share: emulators, replicas, a photo host and a backend.

A backend is the app side of the broker: it declares a prefix's topology, subscribes to
its events (terminal ones resolve `Terminals` futures) and deletes the topology at the end.
Emulators run in child processes (`python -m consumer.testing.comfyui_emulator`) or in this
event loop; replicas always run in this event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from pamqp.common import FieldTable
from prometheus_client import CollectorRegistry

from consumer.app import Service
from consumer.settings import ComfyInstanceSettings, Settings, load_settings
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from consumer.topology import Topology, declare_topology
from tests.bench.images import jpeg_bytes, phone_photo
from tests.e2e.harness import delete_topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
START_TIMEOUT_S = 30.0


# Photos and events


@asynccontextmanager
async def photo_host(files: dict[str, bytes]) -> AsyncIterator[str]:
    """A loopback server of `files` under /photos/{name}; yields its base URL."""

    async def serve(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in files:
            raise web.HTTPNotFound
        return web.Response(body=files[name], content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/photos/{name}", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/photos"
    finally:
        await runner.cleanup()


def photo(size: tuple[int, int]) -> bytes:
    return jpeg_bytes(phone_photo(size), quality=90)


@dataclass
class Terminals:
    """Arrival time (perf_counter) and body of the terminal event of each expected task."""

    expected: dict[str, asyncio.Future[tuple[float, dict[str, Any]]]] = field(default_factory=dict)

    def expect(self, task_id: str) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        future = asyncio.get_running_loop().create_future()
        self.expected[task_id] = future
        return future

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        arrived = time.perf_counter()
        event = orjson.loads(message.body)
        future = self.expected.get(event.get("task_id", ""))
        if event.get("event") in TERMINAL and future is not None and not future.done():
            future.set_result((arrived, event))


@asynccontextmanager
async def subscribe(channel: AbstractChannel, topology: Topology) -> AsyncIterator[Terminals]:
    """A backend's event subscriber on `<prefix>.events` (auto-ack: its cost is not ours)."""
    terminals = Terminals()
    exchange = await channel.get_exchange(topology.events)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, "#")
    tag = await queue.consume(terminals.on_message, no_ack=True)
    try:
        yield terminals
    finally:
        await queue.cancel(tag)


@asynccontextmanager
async def backend(
    amqp_url: str, topology: Topology
) -> AsyncIterator[tuple[AbstractChannel, Terminals]]:
    """The publisher/subscriber side; deletes the prefix's topology at the end."""
    properties: FieldTable = {"connection_name": f"{topology.prefix}.backend"}
    try:
        async with await aio_pika.connect(amqp_url, client_properties=properties) as conn:
            channel = await conn.channel()
            await declare_topology(channel, topology)
            async with subscribe(channel, topology) as terminals:
                yield channel, terminals
    finally:
        await clean_up(amqp_url, topology)


async def clean_up(amqp_url: str, topology: Topology) -> None:
    """On a fresh connection, so that cleaning up survives a broker that closed ours."""
    async with await aio_pika.connect(amqp_url) as connection:
        await delete_topology(await connection.channel(), topology)


@asynccontextmanager
async def deadline(timeout_s: float) -> AsyncIterator[None]:
    """Fail instead of hanging when terminal events stop coming (e.g. the broker restarted)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        msg = f"no terminal event within {timeout_s:g} s: was the broker restarted or closed?"
        raise RuntimeError(msg) from exc


# Emulators and replicas


@asynccontextmanager
async def inline_emulator(faults: Faults) -> AsyncIterator[str]:
    async with ComfyEmulator(faults) as emulator:
        yield emulator.url


def emulator_flags(faults: Faults) -> list[str]:
    """The command-line flags of the timing fields of `faults` that are set."""
    timings = {
        "--step-seconds": faults.step_seconds,
        "--model-load-seconds": faults.model_load_seconds,
        "--model-reload-seconds": faults.model_reload_seconds,
        "--lora-load-seconds": faults.lora_load_seconds,
    }
    return [part for flag, s in timings.items() if s is not None for part in (flag, str(s))]


@asynccontextmanager
async def child_emulator(faults: Faults) -> AsyncIterator[str]:
    """`python -m consumer.testing.comfyui_emulator` on a free port; yields its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "consumer.testing.comfyui_emulator", "--port", "0"),
        *emulator_flags(faults),
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            line = (await process.stdout.readline()).decode()
        if "listening on http" not in line:
            raise RuntimeError(f"the emulator did not start: {line!r}")
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        with contextlib.suppress(ProcessLookupError):
            process.terminate()
        await process.wait()


@asynccontextmanager
async def emulators(count: int, faults: Faults, inline: bool) -> AsyncIterator[list[str]]:
    start = inline_emulator if inline else child_emulator
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(start(faults)) for _ in range(count)]


def replica_settings(
    amqp_url: str, prefix: str, urls: list[str], output_dir: Path, **overrides: Any
) -> Settings:
    """Settings as tests/e2e/conftest.py builds them, with the default progress interval."""
    values: dict[str, Any] = {
        "amqp_url": amqp_url,
        "amqp_prefix": prefix,
        "comfyui_instances": [
            ComfyInstanceSettings(url=url, name=f"comfy-{i}", max_concurrency=2)
            for i, url in enumerate(urls)
        ],
        "image_url_allowed_hosts": ["127.0.0.1"],
        "output_dir": output_dir,
        "public_base_url": "http://outputs.test",
        "sidecar_host": "127.0.0.1",
        "sidecar_port": 0,
    }
    values.update(overrides)
    return load_settings(**values)


@asynccontextmanager
async def replica(settings: Settings, name: str = "bench-replica") -> AsyncIterator[Service]:
    """A replica in this event loop, ready to consume, stopped cleanly at the end."""
    service = Service(settings, registry=CollectorRegistry(), name=name)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    try:
        ready = asyncio.create_task(service.ready.wait())
        async with asyncio.timeout(START_TIMEOUT_S):
            await asyncio.wait({ready, task}, return_when=asyncio.FIRST_COMPLETED)
        if task.done():
            ready.cancel()
            task.result()
        yield service
    finally:
        stop.set()
        async with asyncio.timeout(START_TIMEOUT_S):
            await task
