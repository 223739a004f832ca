"""The fault suite's harness: one `FaultRun` per scenario.

    async with fault_run("kill -9, one of three") as run:     # conftest fixture `fault_run`
        replicas = await run.spawn(3)                         # real `python -m consumer` processes
        task_ids = await run.publish_tasks(90)                # confirmed, unique task ids
        await run.wait_terminal(30)                           # mid-run
        await replicas[0].kill()                              # the fault
        row = await run.finish()                              # the checker (asserts, records a row)

A run owns, in order: in-process ComfyUI emulators (faults switchable at run time), a tiny
photo host, the broker topology with an independent event subscriber bound before any
publish, a confirmed load publisher, and the replicas. `finish()` waits for every task's
terminal event, stops the replicas (SIGTERM, exit code 0), then checks the store, the work
queue and the dead letters, and records a `SummaryRow` (printed by conftest at the end).
Clean-up deletes the run's queues, exchanges and Redis keys, and stops every process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiohttp
import orjson
from aio_pika.abc import AbstractChannel, AbstractRobustConnection
from redis.asyncio import Redis

from consumer.state import RedisTaskStore
from consumer.testing.comfyui_emulator import ComfyEmulator, Faults
from consumer.topology import Topology, declare_topology
from tests.faults.harness_checks import DeadLetter, SummaryRow, check_run, queue_depth
from tests.faults.harness_events import EventCollector
from tests.faults.harness_photos import PhotoHost, photo_host
from tests.faults.harness_replica import LogLine, Replica

__all__ = [
    "DeadLetter",
    "FaultConfig",
    "FaultRun",
    "PhotoHost",
    "Replica",
    "SummaryRow",
    "open_fault_run",
]

FINISH_TIMEOUT_S = 90.0
PUBLISH_CHUNK = 200
BULK_EVERY = 3  # every third task is published as bulk work (transform.bulk)
USER_ID = "fault_user"


@dataclass(frozen=True)
class FaultConfig:
    """What a scenario runs against; `env` overrides the replicas' environment."""

    scenario: str
    amqp_url: str
    redis_url: str
    workdir: Path
    prefix: str
    instances: int = 3
    max_concurrency: int = 2
    faults: Faults = field(default_factory=Faults)
    delivery_limit: int = 5
    env: Mapping[str, str] = field(default_factory=dict)


class FaultRun:
    """Everything one scenario needs; built and torn down by `open_fault_run`."""

    def __init__(self, config: FaultConfig, rows: list[SummaryRow]) -> None:
        self.config = config
        self.rows = rows
        self.notes: list[str] = []
        self.topology = Topology(config.prefix)
        self.redis_prefix = f"{config.prefix}:"
        self.emulators: list[ComfyEmulator] = []
        self.photos = PhotoHost()
        self.events = EventCollector(self.topology)
        self.replicas: list[Replica] = []
        self.task_ids: list[str] = []
        self.owners: dict[str, str] = {}  # task id -> user, where not USER_ID
        self.poison: list[bytes] = []
        self.dead_letters: list[DeadLetter] = []  # filled by finish()
        self.redis = Redis.from_url(config.redis_url, decode_responses=True)
        self.store = RedisTaskStore(self.redis, ttl_s=3600, key_prefix=self.redis_prefix)
        self.started_at = time.monotonic()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None

    def __repr__(self) -> str:
        return f"<FaultRun {self.config.scenario!r} tasks={len(self.task_ids)} {self.events!r}>"

    @property
    def channel(self) -> AbstractChannel:
        if self._channel is None:
            raise RuntimeError("the run is not open")
        return self._channel

    def env(self, **overrides: str) -> dict[str, str]:
        """A replica's environment (see the faults brief); keyword overrides win."""
        instances = [
            {"url": e.url, "name": f"comfy-{i}", "max_concurrency": self.config.max_concurrency}
            for i, e in enumerate(self.emulators)
        ]
        env = {
            "AMQP_URL": self.config.amqp_url,
            "AMQP_PREFIX": self.config.prefix,
            "AMQP_DELIVERY_LIMIT": str(self.config.delivery_limit),
            "COMFYUI_INSTANCES": orjson.dumps(instances).decode(),
            "STATE_BACKEND": "redis",
            "REDIS_URL": self.config.redis_url,
            "REDIS_KEY_PREFIX": self.redis_prefix,
            "IMAGE_URL_ALLOWED_HOSTS": "127.0.0.1",
            "OUTPUT_DIR": str(self.config.workdir / "outputs"),
            "PUBLIC_BASE_URL": "http://outputs.test",
            "SIDECAR_HOST": "127.0.0.1",
            "COMFYUI_HEALTH_INTERVAL_S": "0.2",
            "COMFYUI_OUTAGE_GRACE_S": "1",
            "RETRY_BACKOFF_S": "0.05",
            "RETRY_BACKOFF_MAX_S": "0.5",
            "LEASE_TTL_S": "3",
            "PROGRESS_INTERVAL_MS": "500",
            "SHUTDOWN_GRACE_S": "10",
            "EXECUTION_TIMEOUT_S": "20",
            "TASK_TIMEOUT_S": "60",
            "MAX_CONCURRENT_TASKS": str(self.config.max_concurrency * len(self.emulators)),
            "MAX_ATTEMPTS": "5",
            "LOG_LEVEL": "INFO",
        }
        return {**env, **self.config.env, **overrides}

    async def spawn(self, count: int = 1, *, wait_ready: bool = True, **env: str) -> list[Replica]:
        """Start `count` replicas (concurrently); each waits for its "ready" line."""
        base = len(self.replicas)
        new = [
            Replica(f"replica-{base + i}", self.env(**env), self.config.workdir)
            for i in range(count)
        ]
        self.replicas.extend(new)
        await asyncio.gather(*(r.start(wait_ready=wait_ready) for r in new))
        return new

    def owner(self, task_id: str) -> str:
        """The user whose task `task_id` is (task ids are scoped by user)."""
        return self.owners.get(task_id, USER_ID)

    def request(self, index: int, **fields: Any) -> dict[str, Any]:
        """A valid transform request with a task id unique to this run."""
        body = {
            "task_id": f"{self.config.prefix}-{index:06d}",
            "user_id": USER_ID,
            "image_url": self.photos.url("photo.jpg"),
            "style_type": "clay",
        }
        return {**body, **fields}

    async def publish_tasks(self, count: int, **fields: Any) -> list[str]:
        """Publish `count` requests (publisher confirms); returns their task ids. Every
        `BULK_EVERY`th goes to `transform.bulk`, so each fault hits both queues."""
        start = len(self.task_ids)
        bodies = [self.request(start + i, **fields) for i in range(count)]
        keys = [_routing_key(start + i) for i in range(count)]
        for first in range(0, count, PUBLISH_CHUNK):
            chunk = range(first, min(first + PUBLISH_CHUNK, count))
            await asyncio.gather(*(self.publish(orjson.dumps(bodies[i]), keys[i]) for i in chunk))
        ids = [b["task_id"] for b in bodies]
        self.task_ids.extend(ids)
        return ids

    async def publish(
        self, body: bytes, routing_key: str = "transform", *, poison: bool = False, **props: Any
    ) -> None:
        """Publish raw bytes as a backend would; `poison=True` expects it in the dead letters."""
        props.setdefault("content_type", "application/json")
        props.setdefault("delivery_mode", aio_pika.DeliveryMode.PERSISTENT)
        exchange = await self.channel.get_exchange(self.topology.requests, ensure=False)
        await exchange.publish(aio_pika.Message(body, **props), routing_key)
        if poison:
            self.poison.append(body)

    async def wait_terminal(self, count: int, timeout_s: float = FINISH_TIMEOUT_S) -> None:
        """Until `count` of the published tasks have a terminal event."""
        await self.events.wait_terminal(set(self.task_ids), count, timeout_s)

    async def lookup(self, replica: Replica, task_id: str) -> dict[str, Any] | None:
        """`GET /api/v1/task/{id}` on `replica`'s sidecar; None on 404."""
        url = f"{replica.sidecar_url}/api/v1/task/{task_id}"
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            if response.status == 404:
                return None
            response.raise_for_status()
            data: dict[str, Any] = await response.json()
            return data

    async def wait_log_any(
        self, predicate: Callable[[LogLine], bool], timeout_s: float
    ) -> tuple[Replica, LogLine]:
        """The first line matching `predicate` on any running replica (its current run)."""
        running = [r for r in self.replicas if r.running]
        waits = {asyncio.ensure_future(r.wait_log(predicate, timeout_s)): r for r in running}
        try:
            done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waits:
                task.cancel()
            await asyncio.gather(*waits, return_exceptions=True)
        first = next(iter(done))
        return waits[first], first.result()

    async def stop_replicas(self) -> list[int]:
        """SIGTERM every running replica; their exit codes."""
        running = [r for r in self.replicas if r.running]
        return list(await asyncio.gather(*(r.terminate() for r in running)))

    async def finish(self, timeout_s: float = FINISH_TIMEOUT_S) -> SummaryRow:
        """The checker: wait for every terminal event, stop the replicas, assert, record."""
        return await check_run(self, timeout_s)

    async def queue_depth(self, name: str) -> int:
        return await queue_depth(self.config.amqp_url, name)

    def elapsed_s(self) -> float:
        return time.monotonic() - self.started_at


@asynccontextmanager
async def open_fault_run(config: FaultConfig, rows: list[SummaryRow]) -> AsyncIterator[FaultRun]:
    """A started run (emulators, photos, topology, subscriber); `finish()` appends to `rows`."""
    run = FaultRun(config, rows)
    async with AsyncExitStack() as stack:
        stack.push_async_callback(_delete_redis_keys, run)
        for _ in range(config.instances):
            emulator = ComfyEmulator(Faults(**vars(config.faults)))
            await emulator.start()
            stack.push_async_callback(emulator.stop)
            run.emulators.append(emulator)
        await stack.enter_async_context(photo_host(run.photos))
        await _open_broker(run, stack)
        stack.push_async_callback(_close_replicas, run)
        run.started_at = time.monotonic()
        yield run


async def _open_broker(run: FaultRun, stack: AsyncExitStack) -> None:
    connection = await aio_pika.connect_robust(
        run.config.amqp_url,
        client_properties={"connection_name": f"{run.config.prefix}.test-publisher"},
    )
    stack.push_async_callback(connection.close)
    run._connection = connection
    run._channel = await connection.channel()
    stack.push_async_callback(_delete_topology, run)
    await declare_topology(run.channel, run.topology, run.config.delivery_limit)
    await run.events.start(run.config.amqp_url)
    stack.push_async_callback(run.events.close)


async def _close_replicas(run: FaultRun) -> None:
    await asyncio.gather(*(r.close() for r in run.replicas), return_exceptions=True)


async def _delete_topology(run: FaultRun) -> None:
    async with await aio_pika.connect(run.config.amqp_url) as connection:
        channel = await connection.channel()
        names = [spec.name for spec in run.topology.queues()] + [run.events.queue_name]
        for name in names:
            await channel.queue_delete(name)
        for exchange in run.topology.exchanges():
            await channel.exchange_delete(exchange.name)


async def _delete_redis_keys(run: FaultRun) -> None:
    client = run.redis
    keys = [key async for key in client.scan_iter(match=f"{run.redis_prefix}*", count=1000)]
    for first in range(0, len(keys), 500):
        await client.delete(*keys[first : first + 500])
    await run.store.close()


def _routing_key(index: int) -> str:
    return "transform.bulk" if index % BULK_EVERY == BULK_EVERY - 1 else "transform"
