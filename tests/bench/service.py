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
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractChannel

from consumer.testing.comfyui_emulator import Faults
from consumer.topology import Topology
from tests.bench import rig
from tests.bench.comfyui import percentile
from tests.bench.rig import (
    DEFAULT_AMQP_URL,
    Terminals,
    deadline,
    emulators,
    photo,
    replica,
    replica_settings,
)

SEQUENTIAL_PHOTO = (1024, 768)
BURST_PHOTO = (256, 256)
WARM_UP_TASKS = 3
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


# The backend


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
    async with rig.backend(options.amqp_url, topology) as (channel, terminals):
        yield Bench(channel, topology, terminals)


async def run_sequential(options: Options, bench: Bench, base_url: str, out: Path) -> Sequential:
    faults = Faults(step_seconds=options.step_seconds)
    async with emulators(1, faults, options.inline_emulators) as urls:
        prefix = bench.topology.prefix
        settings = replica_settings(options.amqp_url, prefix, urls, out / "seq")
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
    async with emulators(options.instances, Faults(), options.inline_emulators) as urls:
        settings = replica_settings(
            options.amqp_url, bench.topology.prefix, urls, out / "burst", max_concurrent_tasks=64
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
        async with rig.photo_host(files) as base_url, backend(options, topology) as bench:
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
