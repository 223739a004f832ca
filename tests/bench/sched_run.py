"""One benchmark run: fresh emulators, replica(s) under one policy, a workload, the results.

Each run has its own AMQP prefix (declared by the backend, deleted at the end), its own
emulator processes (so model memory and page cache start cold) and replicas in this event
loop. Times are wall-clock seconds (`time.time()`), the clock of the emulators' /history.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import orjson
from aio_pika.abc import AbstractChannel
from redis.asyncio import Redis

from consumer.app import Service
from consumer.settings import SchedulerPolicy
from consumer.testing.comfyui_emulator import Faults
from consumer.topology import BULK_KEY, Topology
from tests.bench import rig
from tests.bench.sched_timeline import Prompt, classify, histories

RUN_TIMEOUT_S = 300.0
READY_POLL_S = 0.05


@dataclass(frozen=True)
class Single:
    """One request; `bulk` publishes it to the bulk queue (routing key transform.bulk)."""

    task_id: str
    user: str
    style: str
    bulk: bool = False
    at_s: float = 0.0  # after the first publish

    def task_ids(self) -> list[str]:
        return [self.task_id]


@dataclass(frozen=True)
class Batch:
    """A batch request (bulk by default): tasks `<batch_id>-<index>`."""

    batch_id: str
    user: str
    style: str
    size: int
    at_s: float = 0.0

    def task_ids(self) -> list[str]:
        return [f"{self.batch_id}-{i}" for i in range(self.size)]


Work = Single | Batch


@dataclass(frozen=True)
class Rig:
    """What every run shares."""

    amqp_url: str
    photo_url: str
    workflows_dir: Path
    output_dir: Path
    inline_emulators: bool
    redis_url: str = "redis://127.0.0.1:6379/0"


@dataclass(frozen=True)
class RunSpec:
    label: str
    policy: SchedulerPolicy
    faults: Faults
    workload: tuple[Work, ...]
    replicas: tuple[int, ...] = (4,)  # instances of each replica (each its own)
    wait_for: frozenset[str] | None = None  # task ids that end the run; None: all of them
    shared_store: bool = False  # STATE_BACKEND=redis (keys under the run's prefix, deleted)
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def instances(self) -> int:
        return sum(self.replicas)


@dataclass
class RunResult:
    spec: RunSpec
    t0_s: float  # first publish
    published_s: dict[str, float]  # task id -> its request's publish
    ended: dict[str, tuple[float, str]]  # task id -> (terminal event received, event kind)
    prompts: list[Prompt]
    metric_loads: int  # style_consumer_model_loads_total of all replicas: their own view
    extra: dict[str, Any] = field(default_factory=dict)  # what a probe measured

    @property
    def makespan_s(self) -> float:
        return max(at for at, _ in self.ended.values()) - self.t0_s

    def done_s(self, task_id: str) -> float:
        """Terminal event of `task_id`, relative to the first publish."""
        return self.ended[task_id][0] - self.t0_s

    def latency_s(self, task_id: str) -> float:
        return self.ended[task_id][0] - self.published_s[task_id]


Probe = Callable[[list[Service], AbstractChannel, Topology, asyncio.Event], Awaitable[Any]]
"""Measures alongside a workload until the event is set, then returns its measurements."""
WALL_MINUS_PERF_S = time.time() - time.perf_counter()  # Terminals stamp with perf_counter


async def run(rig_: Rig, spec: RunSpec, probe: Probe | None = None) -> RunResult:
    """Run `spec` on fresh emulators and replicas. `probe` runs alongside the workload until
    the awaited tasks ended (then it is told to stop and returns what it measured: `extra`)."""
    topology = Topology(f"bsched{uuid.uuid4().hex[:10]}")
    async with AsyncExitStack() as stack:
        channel, terminals = await stack.enter_async_context(rig.backend(rig_.amqp_url, topology))
        urls = await stack.enter_async_context(
            rig.emulators(spec.instances, spec.faults, rig_.inline_emulators)
        )
        if spec.shared_store:
            await stack.enter_async_context(redis_keys(rig_.redis_url, f"{topology.prefix}:"))
        async with replicas(rig_, spec, topology, urls) as services:
            ended = {t: terminals.expect(t) for w in spec.workload for t in w.task_ids()}
            waited = [ended[t] for t in (spec.wait_for or ended)]
            async with probing(probe, services, channel, topology) as extra:
                t0_s, published = await publish_all(channel, topology, rig_.photo_url, spec)
                async with rig.deadline(RUN_TIMEOUT_S):
                    await asyncio.gather(*waited)
            loads = sum(_loads_counted(s) for s in services)
        prompts = classify(await histories(urls), spec.faults)
    results = {
        task_id: (arrived + WALL_MINUS_PERF_S, event["event"])
        for task_id, future in ended.items()
        if future.done()
        for arrived, event in [future.result()]
    }
    return RunResult(spec, t0_s, published, results, prompts, loads, extra)


@asynccontextmanager
async def probing(
    probe: Probe | None, services: list[Service], channel: AbstractChannel, topology: Topology
) -> AsyncIterator[dict[str, Any]]:
    """Run `probe` for the body of the `with`; its measurements fill the yielded dict."""
    measured: dict[str, Any] = {}
    if probe is None:
        yield measured
        return
    stop = asyncio.Event()
    task = asyncio.create_task(probe(services, channel, topology, stop))
    try:
        yield measured
    finally:
        stop.set()
        measured.update(await task)


def _loads_counted(service: Service) -> int:
    return int(
        sum(
            sample.value
            for metric in service.metrics.model_loads.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
    )


@asynccontextmanager
async def replicas(
    rig_: Rig, spec: RunSpec, topology: Topology, urls: list[str]
) -> AsyncIterator[list[Service]]:
    """`spec.replicas` replicas, each on its own slice of `urls`, all instances healthy."""
    store = {}
    if spec.shared_store:
        store = {"state_backend": "redis", "redis_url": rig_.redis_url}
        store["redis_key_prefix"] = f"{topology.prefix}:"
    async with AsyncExitStack() as stack:
        services, first = [], 0
        for index, count in enumerate(spec.replicas):
            settings = rig.replica_settings(
                rig_.amqp_url,
                topology.prefix,
                urls[first : first + count],
                rig_.output_dir / f"{topology.prefix}-{index}",
                scheduler=spec.policy,
                workflows_dir=rig_.workflows_dir,
                **store,
                **spec.overrides,
            )
            first += count
            services.append(await stack.enter_async_context(rig.replica(settings, f"r{index}")))
        for service in services:
            await all_healthy(service)
        yield services


@asynccontextmanager
async def redis_keys(url: str, prefix: str) -> AsyncIterator[None]:
    """Delete every key under `prefix` at the end."""
    try:
        yield
    finally:
        client = Redis.from_url(url)
        try:
            keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
            if keys:
                await client.delete(*keys)
        finally:
            await client.aclose()


async def all_healthy(service: Service) -> None:
    """Until every instance is healthy and the consumer's window is the whole capacity."""
    async with asyncio.timeout(rig.START_TIMEOUT_S):
        while True:
            instances = service.health()["instances"]
            capacity = sum(i["capacity"] for i in instances if i["healthy"])
            total = sum(i["capacity"] for i in instances)
            window = min(total, service.settings.max_concurrent_tasks)
            if capacity == total and service._intake._prefetch == window:
                return
            await asyncio.sleep(READY_POLL_S)


async def publish_all(
    channel: AbstractChannel, topology: Topology, photo_url: str, spec: RunSpec
) -> tuple[float, dict[str, float]]:
    """Publish the workload in order, each item at its `at_s`; (first publish, per task)."""
    exchange = await channel.get_exchange(topology.requests)
    published: dict[str, float] = {}
    t0_s = time.time()
    for work in sorted(spec.workload, key=lambda w: w.at_s):  # stable: keeps the order
        if (delay_s := t0_s + work.at_s - time.time()) > 0:
            await asyncio.sleep(delay_s)  # the workload's own schedule
        key, body = request(work, photo_url)
        message = aio_pika.Message(
            orjson.dumps(body),
            content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        )
        now = time.time()
        await exchange.publish(message, key)
        published.update(dict.fromkeys(work.task_ids(), now))
    return t0_s, published


def request(work: Work, photo_url: str) -> tuple[str, dict[str, Any]]:
    """(routing key, body) of one workload item."""
    if isinstance(work, Batch):
        body = {
            "batch_id": work.batch_id,
            "user_id": work.user,
            "style_type": work.style,
            "image_urls": [photo_url] * work.size,
        }
        return "transform.batch", body
    body = {
        "task_id": work.task_id,
        "user_id": work.user,
        "style_type": work.style,
        "image_url": photo_url,
    }
    return (BULK_KEY if work.bulk else "transform"), body
