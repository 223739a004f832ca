"""End-to-end benchmark of one replica through the real broker: `python -m tests.bench.service`.

Prints two figures:
  1. overhead per task beyond emulated execution, one task at a time (p50/p99 ms):
     publish -> `completed` event received, minus the emulator's own execution time of the
     prompt (execution_start -> execution_success from its /history), on one instance whose
     sampler steps take `--step-seconds` (20 steps per styles.toml: 1 s at 0.05), with a
     realistic 1024x768 photo;
  2. tasks/s of one replica on four zero-time instances (max_concurrency 2 each): `--burst`
     tasks published at once, first publish -> last terminal event, with a 256x256 photo;
     plus this process's CPU time per task and peak RSS.

By default the emulators run in child processes, so CPU time and RSS are the replica's (plus
this harness's small photo host and subscriber); `--inline-emulators` runs them in this event
loop, as the e2e tests do. Needs RabbitMQ on 127.0.0.1:5672 (or `--amqp-url`). Everything is
declared under a unique AMQP_PREFIX and deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiohttp import web
from pamqp.common import FieldTable
from prometheus_client import CollectorRegistry

from consumer.app import Service
from consumer.settings import ComfyInstanceSettings, Settings, load_settings
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from consumer.topology import Topology, declare_topology
from tests.bench.comfyui import percentile
from tests.bench.images import jpeg_bytes, phone_photo
from tests.e2e.harness import delete_topology

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
TERMINAL = frozenset({"completed", "failed", "cancelled"})
SEQUENTIAL_PHOTO = (1024, 768)
BURST_PHOTO = (256, 256)
WARM_UP_TASKS = 3
START_TIMEOUT_S = 30.0
TASK_TIMEOUT_S = 60.0  # one task, one at a time
BURST_TIMEOUT_S = 300.0  # the whole burst


@dataclass(frozen=True)
class Options:
    amqp_url: str
    tasks: int
    step_seconds: float
    burst: int
    instances: int
    inline_emulators: bool


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


# Emulators and the replica


@asynccontextmanager
async def inline_emulator(step_seconds: float) -> AsyncIterator[str]:
    async with ComfyEmulator(Faults(step_seconds=step_seconds)) as emulator:
        yield emulator.url


@asynccontextmanager
async def child_emulator(step_seconds: float) -> AsyncIterator[str]:
    """`python -m consumer.testing.comfyui_emulator` on a free port; yields its URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "consumer.testing.comfyui_emulator", "--port", "0"),
        *("--step-seconds", str(step_seconds)),
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
async def emulators(count: int, step_seconds: float, inline: bool) -> AsyncIterator[list[str]]:
    start = inline_emulator if inline else child_emulator
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(start(step_seconds)) for _ in range(count)]


def replica_settings(
    options: Options, prefix: str, urls: list[str], output_dir: Path, **overrides: Any
) -> Settings:
    """Settings as tests/e2e/conftest.py builds them, with the default progress interval."""
    values: dict[str, Any] = {
        "amqp_url": options.amqp_url,
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
async def replica(settings: Settings) -> AsyncIterator[Service]:
    """A replica in this event loop, ready to consume, stopped cleanly at the end."""
    service = Service(settings, registry=CollectorRegistry(), name="bench-replica")
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


@dataclass
class Bench:
    """The backend side: a channel to publish on and the terminal events it sees."""

    channel: AbstractChannel
    topology: Topology
    terminals: Terminals

    async def publish(self, photo_url: str) -> asyncio.Future[tuple[float, dict[str, Any]]]:
        task_id = f"bench-{uuid.uuid4().hex[:12]}"
        ended = self.terminals.expect(task_id)
        body = {"task_id": task_id, "user_id": "bench", "image_url": photo_url}
        body["style_type"] = "clay"
        message = aio_pika.Message(
            orjson.dumps(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        exchange = await self.channel.get_exchange(self.topology.requests)
        await exchange.publish(message, "transform")
        return ended


@asynccontextmanager
async def deadline(timeout_s: float) -> AsyncIterator[None]:
    """Fail instead of hanging when terminal events stop coming (e.g. the broker restarted)."""
    try:
        async with asyncio.timeout(timeout_s):
            yield
    except TimeoutError as exc:
        msg = f"no terminal event within {timeout_s:g} s: was the broker restarted or closed?"
        raise RuntimeError(msg) from exc


# 1. Overhead, one task at a time


@dataclass(frozen=True)
class Sample:
    e2e_ms: float
    emulated_ms: float
    timings_ms: dict[str, int]

    @property
    def overhead_ms(self) -> float:
        return self.e2e_ms - self.emulated_ms

    @property
    def rest_ms(self) -> float:
        """Normalising the photo plus the pipeline's bookkeeping (started/progress events)."""
        t = self.timings_ms
        return float(t["total"] - t["download"] - t["execute"] - t["upload"])


async def last_execution_ms(http: aiohttp.ClientSession, emulator_url: str) -> float:
    """execution_start -> execution_success of the emulator's latest prompt (its /history)."""
    async with http.get(f"{emulator_url}/history", params={"max_items": "1"}) as response:
        (entry,) = (await response.json()).values()
    stamps = {kind: data["timestamp"] for kind, data in entry["status"]["messages"]}
    return float(stamps["execution_success"] - stamps["execution_start"])


async def one_task(bench: Bench, http: aiohttp.ClientSession, photo_url: str, url: str) -> Sample:
    started = time.perf_counter()
    ended = await bench.publish(photo_url)
    async with deadline(TASK_TIMEOUT_S):
        arrived, event = await ended
    if event["event"] != "completed":
        raise RuntimeError(f"task ended {event['event']}: {event.get('error')}")
    emulated_ms = await last_execution_ms(http, url)
    timings = {k: v for k, v in (event.get("timings_ms") or {}).items() if v is not None}
    return Sample((arrived - started) * 1000, emulated_ms, timings)


async def sequential(options: Options, bench: Bench, photo_url: str, url: str) -> list[Sample]:
    async with aiohttp.ClientSession() as http:
        for _ in range(WARM_UP_TASKS):
            await one_task(bench, http, photo_url, url)
        return [await one_task(bench, http, photo_url, url) for _ in range(options.tasks)]


@dataclass(frozen=True)
class Sequential:
    samples: list[Sample]
    cpu_ms_per_task: float


# 2. Throughput, a burst at once


@dataclass(frozen=True)
class Burst:
    tasks: int
    seconds: float
    cpu_s: float
    outcomes: dict[str, int]
    execute_ms: list[float]
    emulators_cpu_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.tasks / self.seconds


async def burst(bench: Bench, photo_url: str, count: int) -> Burst:
    await asyncio.gather(*[await bench.publish(photo_url) for _ in range(8)])  # warm-up
    cpu_started, started = time.process_time(), time.perf_counter()
    endings = await asyncio.gather(*(bench.publish(photo_url) for _ in range(count)))
    async with deadline(BURST_TIMEOUT_S):
        ended = await asyncio.gather(*endings)
    seconds = max(arrived for arrived, _ in ended) - started
    outcomes: dict[str, int] = {}
    for _, event in ended:
        outcomes[event["event"]] = outcomes.get(event["event"], 0) + 1
    cpu_s = time.process_time() - cpu_started
    return Burst(count, seconds, cpu_s, outcomes, timing_of(ended, "execute"))


def timing_of(ended: list[tuple[float, dict[str, Any]]], key: str) -> list[float]:
    return [float(e["timings_ms"][key]) for _, e in ended if (e.get("timings_ms") or {}).get(key)]


# Running and reporting


@asynccontextmanager
async def backend(options: Options, topology: Topology) -> AsyncIterator[Bench]:
    """The publisher/subscriber side; deletes the prefix's topology at the end."""
    properties: FieldTable = {"connection_name": f"{topology.prefix}.backend"}
    try:
        async with await aio_pika.connect(options.amqp_url, client_properties=properties) as conn:
            channel = await conn.channel()
            await declare_topology(channel, topology)
            async with subscribe(channel, topology) as terminals:
                yield Bench(channel, topology, terminals)
    finally:
        await clean_up(options.amqp_url, topology)


async def clean_up(amqp_url: str, topology: Topology) -> None:
    """On a fresh connection, so that cleaning up survives a broker that closed ours."""
    async with await aio_pika.connect(amqp_url) as connection:
        await delete_topology(await connection.channel(), topology)


async def run_sequential(options: Options, bench: Bench, base_url: str, out: Path) -> Sequential:
    async with emulators(1, options.step_seconds, options.inline_emulators) as urls:
        settings = replica_settings(options, bench.topology.prefix, urls, out / "seq")
        async with replica(settings):
            cpu_started_s = time.process_time()
            samples = await sequential(options, bench, f"{base_url}/large.jpg", urls[0])
            cpu_s = time.process_time() - cpu_started_s
    return Sequential(samples, cpu_s / (len(samples) + WARM_UP_TASKS) * 1000)


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # of children already waited for
    return usage.ru_utime + usage.ru_stime


async def run_burst(options: Options, bench: Bench, base_url: str, out: Path) -> Burst:
    children_before_s = children_cpu_s()
    async with emulators(options.instances, 0.0, options.inline_emulators) as urls:
        settings = replica_settings(
            options, bench.topology.prefix, urls, out / "burst", max_concurrent_tasks=64
        )
        async with replica(settings):
            result = await burst(bench, f"{base_url}/small.jpg", options.burst)
    return replace(result, emulators_cpu_s=children_cpu_s() - children_before_s)


def row(name: str, values_ms: list[float]) -> str:
    if not values_ms:
        return f"  {name:<50} {'-':>9} {'-':>9} {'-':>9}"
    p50, p99 = percentile(values_ms, 0.5), percentile(values_ms, 0.99)
    return f"  {name:<50} {p50:>9.1f} {p99:>9.1f} {statistics.fmean(values_ms):>9.1f}"


def stage(key: str) -> Callable[[Sample], float]:
    return lambda s: float(s.timings_ms[key])


SEQUENTIAL_ROWS: list[tuple[str, Callable[[Sample], float]]] = [
    ("publish -> completed received", lambda s: s.e2e_ms),
    ("emulated execution (start->success)", lambda s: s.emulated_ms),
    ("OVERHEAD = e2e - emulated execution", lambda s: s.overhead_ms),
    ("  event timings_ms.download", stage("download")),
    ("  event timings_ms.execute", stage("execute")),
    ("  event timings_ms.execute - emulated", lambda s: stage("execute")(s) - s.emulated_ms),
    ("  event timings_ms.upload", stage("upload")),
    ("  timings_ms.total - download - execute - upload", lambda s: s.rest_ms),
    (
        "  e2e - timings_ms.total (broker, accept, finish)",
        lambda s: s.e2e_ms - s.timings_ms["total"],
    ),
]


def column(samples: list[Sample], value: Callable[[Sample], float]) -> list[float]:
    """`value` of each sample that has the timings it reads."""
    values = []
    for sample in samples:
        with contextlib.suppress(KeyError):
            values.append(value(sample))
    return values


def sequential_report(options: Options, result: Sequential) -> list[str]:
    samples = result.samples
    nominal_ms = options.step_seconds * 20 * 1000
    w, h = SEQUENTIAL_PHOTO
    title = (
        f"1. one task at a time: {len(samples)} tasks (+{WARM_UP_TASKS} warm-up), 1 instance, "
        f"{w}x{h} JPEG, style clay, step {options.step_seconds:g} s x 20 = {nominal_ms:g} ms"
    )
    return [
        title,
        f"  {'ms':<50} {'p50':>9} {'p99':>9} {'mean':>9}",
        *(row(name, column(samples, value)) for name, value in SEQUENTIAL_ROWS),
        f"  this process CPU per task: {result.cpu_ms_per_task:.1f} ms",
    ]


def burst_report(options: Options, result: Burst) -> list[str]:
    w, h = BURST_PHOTO
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    where = "in this process" if options.inline_emulators else "in child processes"
    title = (
        f"2. burst: {result.tasks} tasks at once, 1 replica, {options.instances} zero-time "
        f"instances x 2 slots, {w}x{h} JPEG, emulators {where}"
    )
    cpu_ms = result.cpu_s / result.tasks * 1000
    p50, p99 = percentile(result.execute_ms, 0.5), percentile(result.execute_ms, 0.99)
    return [
        title,
        f"  outcomes                 {result.outcomes}",
        f"  first publish -> last    {result.seconds:.2f} s",
        f"  THROUGHPUT               {result.rate:.1f} tasks/s",
        f"  this process CPU         {result.cpu_s:.2f} s = {cpu_ms:.1f} ms/task",
        f"  emulator processes' CPU  {result.emulators_cpu_s:.2f} s (start-up included)",
        f"  timings_ms.execute       p50 {p50:.0f} ms, p99 {p99:.0f} ms",
        f"  peak RSS (whole run)     {peak_rss_mib:.0f} MiB",
    ]


async def main(options: Options) -> None:
    topology = Topology(f"bench{uuid.uuid4().hex[:10]}")
    files = {"large.jpg": photo(SEQUENTIAL_PHOTO), "small.jpg": photo(BURST_PHOTO)}
    with tempfile.TemporaryDirectory(prefix="bench-service-") as folder:
        async with photo_host(files) as base_url, backend(options, topology) as bench:
            one_by_one = await run_sequential(options, bench, base_url, Path(folder))
            result = await run_burst(options, bench, base_url, Path(folder))
    lines = [*sequential_report(options, one_by_one), "", *burst_report(options, result)]
    print("\n".join(lines))  # noqa: T201 - a benchmark's job is to print its numbers


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--amqp-url", default=DEFAULT_AMQP_URL)
    parser.add_argument("--tasks", type=int, default=50, help="sequential tasks (figure 1)")
    parser.add_argument("--step-seconds", type=float, default=0.05)
    parser.add_argument("--burst", type=int, default=500, help="tasks published at once")
    parser.add_argument("--instances", type=int, default=4)
    parser.add_argument("--inline-emulators", action="store_true")
    args = parser.parse_args(argv)
    return Options(
        args.amqp_url,
        args.tasks,
        args.step_seconds,
        args.burst,
        args.instances,
        args.inline_emulators,
    )


if __name__ == "__main__":
    asyncio.run(main(parse()))
