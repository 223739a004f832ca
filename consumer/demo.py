"""`make demo`: the whole service on the embedded defaults, end to end, then exit.

Starts two emulated ComfyUI instances and the service (against the local RabbitMQ),
publishes a batch of photos (bulk work) and then one photo per style (interactive work) as an
app backend would, draws a progress bar per task from the events (the singles overtake the
batch), prints where each result is, and ends with the figures an operator's dashboard shows.
"""

from __future__ import annotations

import asyncio
import io
import socket
import sys
import tempfile
import uuid
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aiohttp import web
from PIL import Image, ImageDraw

from consumer.app import Service
from consumer.figures import Figures
from consumer.logs import configure_logging
from consumer.settings import ComfyInstanceSettings, load_settings
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults

USER_ID = "demo-user"
BATCH_SIZE = 6
STEP_SECONDS = 0.08
BAR_WIDTH = 30
TIMEOUT_S = 120.0
TERMINAL = {"completed", "failed", "cancelled"}


def sample_photo() -> bytes:
    """A small synthetic 'photo': sky, sun, hills."""
    image = Image.new("RGB", (768, 512), (120, 180, 235))
    draw = ImageDraw.Draw(image)
    draw.ellipse((540, 60, 660, 180), fill=(255, 220, 90))
    draw.polygon(
        [(0, 512), (0, 330), (260, 220), (520, 340), (768, 260), (768, 512)], (60, 140, 70)
    )
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


async def serve_photo(stack: AsyncExitStack) -> str:
    """Serve the sample photo on loopback, as an app's CDN would."""
    photo = sample_photo()

    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=photo, content_type="image/jpeg")

    app = web.Application()
    app.router.add_get("/photo.jpg", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    stack.push_async_callback(runner.cleanup)
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return f"http://127.0.0.1:{runner.addresses[0][1]}/photo.jpg"


class Board:
    """One progress bar per task, redrawn as events arrive."""

    def __init__(self, tasks: dict[str, str]) -> None:
        self.tasks = tasks  # task_id -> style
        self.state: dict[str, dict[str, Any]] = {
            t: {"event": "queued", "progress": 0} for t in tasks
        }
        self.done = asyncio.Event()
        self._tty = sys.stdout.isatty()
        self._drawn = False

    def update(self, event: dict[str, Any]) -> None:
        task_id = event.get("task_id")
        if task_id not in self.state:
            return
        self.state[task_id] = event
        self.draw(final=False)
        if all(s["event"] in TERMINAL for s in self.state.values()):
            self.done.set()

    def draw(self, *, final: bool) -> None:
        if not self._tty and not final:
            return
        if self._tty and self._drawn:
            sys.stdout.write(f"\x1b[{len(self.tasks)}F")
        for task_id, style in self.tasks.items():
            s = self.state[task_id]
            filled = BAR_WIDTH * int(s.get("progress") or 0) // 100
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            where = s.get("instance") or ""
            sys.stdout.write(
                f"{style:<13} [{bar}] {s.get('progress', 0):>3}% {s['event']:<10} {where:<22}\n"
            )
        sys.stdout.flush()
        self._drawn = True


async def run_demo() -> int:
    configure_logging("WARNING", debug=True)
    async with AsyncExitStack() as stack:
        emulators = [
            await stack.enter_async_context(ComfyEmulator(Faults(step_seconds=STEP_SECONDS)))
            for _ in range(2)
        ]
        photo_url = await serve_photo(stack)
        output_dir = Path(tempfile.mkdtemp(prefix="style-demo-"))
        port = _free_port()
        settings = load_settings(
            comfyui_instances=[
                ComfyInstanceSettings(url=e.url, name=f"emulator-{i + 1}", max_concurrency=2)
                for i, e in enumerate(emulators)
            ],
            image_url_allowed_hosts=["127.0.0.1"],
            output_dir=output_dir,
            sidecar_host="127.0.0.1",
            sidecar_port=port,
            public_base_url=f"http://127.0.0.1:{port}",
            progress_interval_ms=100,
        )
        service = Service(settings)
        stop = asyncio.Event()
        running = asyncio.create_task(service.run(stop))
        try:
            return await _drive(
                service, settings.amqp_url.get_secret_value(), photo_url, output_dir
            )
        finally:
            stop.set()
            await running


async def _drive(service: Service, amqp_url: str, photo_url: str, output_dir: Path) -> int:
    await asyncio.wait_for(service.ready.wait(), TIMEOUT_S)
    styles = service.catalog.names()
    batch_id = f"demo-batch-{uuid.uuid4().hex[:6]}"
    batch = {f"{batch_id}-{i}": f"batch {i + 1}/{BATCH_SIZE}" for i in range(BATCH_SIZE)}
    singles = {f"demo-{style}-{uuid.uuid4().hex[:6]}": style for style in styles}
    tasks = batch | singles
    board = Board(tasks)
    started = asyncio.get_running_loop().time()
    async with await aio_pika.connect(amqp_url) as connection:
        channel = await connection.channel()
        events = await channel.get_exchange(service.topology.events)
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(events, f"task.*.{USER_ID}")

        async def on_event(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                board.update(orjson.loads(message.body))

        await queue.consume(on_event)
        requests = await channel.get_exchange(service.topology.requests)
        print(
            f"publishing a batch of {BATCH_SIZE} photos (bulk), then {len(singles)} single "
            f"requests, one per style (interactive), to {service.topology.requests}\n"
        )
        await _publish(
            requests,
            "transform.batch",
            {
                "batch_id": batch_id,
                "user_id": USER_ID,
                "image_urls": [photo_url] * BATCH_SIZE,
                "style_type": styles[0],
            },
        )
        for task_id, style in singles.items():
            body = {
                "task_id": task_id,
                "user_id": USER_ID,
                "image_url": photo_url,
                "style_type": style,
            }
            await _publish(requests, "transform", body)
        board.draw(final=False)
        await asyncio.wait_for(board.done.wait(), TIMEOUT_S)
    board.draw(final=True)
    elapsed_s = asyncio.get_running_loop().time() - started
    status = _report(board, output_dir, service.sidecar_port)
    print(Figures.read(service.metrics.registry).render(elapsed_s))
    return status


async def _publish(
    exchange: aio_pika.abc.AbstractExchange, routing_key: str, body: dict[str, Any]
) -> None:
    message = aio_pika.Message(
        orjson.dumps(body),
        content_type="application/json",
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
    )
    await exchange.publish(message, routing_key)


def _report(board: Board, output_dir: Path, port: int | None) -> int:
    print()
    failed = 0
    for task_id, style in board.tasks.items():
        s = board.state[task_id]
        if s["event"] == "completed":
            total_ms = s["timings_ms"]["total"]
            local = output_dir / s["output_image_url"].split("/outputs/", 1)[1]
            print(f"{style:<13} {local}  (seed {s['seed']}, {total_ms} ms on {s['instance']})")
        else:
            failed += 1
            print(f"{style:<13} {s['event']}: {s.get('error')}")
    print(f"\nthe sidecar served them at http://127.0.0.1:{port}/outputs/... while it ran")
    return 1 if failed else 0


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main() -> int:
    return asyncio.run(run_demo())


if __name__ == "__main__":
    sys.exit(main())
