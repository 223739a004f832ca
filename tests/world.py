"""A replica's intake, dispatcher and settle point wired to fakes: no broker, no ComfyUI.

    async with intake_world() as world:
        message = FakeMessage(body=orjson.dumps(request))
        await world.deliver(message)          # the consumer callback, then the task it starts
        assert message.settlements == ["ack"]

The pipeline is a fake that completes at once (or raises what `world.pipeline.fail_with`
holds, or waits on `world.pipeline.hold`); the store is the memory store.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from consumer.dispatcher import Dispatcher
from consumer.events import ReplyPolicy
from consumer.intake import Intake
from consumer.leases import Leases
from consumer.metrics import Metrics
from consumer.pipeline import Result
from consumer.reporter import Reporter
from consumer.settings import REPO_ROOT
from consumer.settle import Settler
from consumer.state import MemoryTaskStore
from consumer.topology import Topology
from consumer.workflows import StyleCatalog
from tests.fakes import FakeMessage, FakePublisher

SETTLE_WAIT_S = 5.0
CATALOG = StyleCatalog.load(REPO_ROOT / "workflows")


@dataclass
class FakePipeline:
    """Runs a job in no time; `fail_with` makes it raise, `hold` makes it wait."""

    fail_with: BaseException | None = None
    hold: asyncio.Event | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)
    runs: list[str] = field(default_factory=list)

    async def run(self, job: Any) -> Result:
        self.runs.append(job.task_id)
        self.started.set()
        if self.hold is not None:
            await self.hold.wait()
        if self.fail_with is not None:
            raise self.fail_with
        return Result(urls=[f"http://outputs.test/{job.task_id}.png"])


@dataclass
class World:
    intake: Intake
    dispatcher: Dispatcher
    settler: Settler
    store: MemoryTaskStore
    publisher: FakePublisher
    pipeline: FakePipeline
    metrics: Metrics

    async def deliver(self, message: FakeMessage, *, settled: bool = True) -> None:
        """Run the consumer callback; with `settled`, wait until the delivery has ended."""
        await self.intake._on_message(message)  # type: ignore[arg-type]
        if settled:
            async with asyncio.timeout(SETTLE_WAIT_S):
                await message.settled.wait()
                await self.dispatcher._idle.wait()

    async def cancel(self, message: FakeMessage) -> None:
        await self.intake._on_control(message)  # type: ignore[arg-type]

    def events(self, name: str | None = None) -> list[Any]:
        return self.publisher.events(name)


@asynccontextmanager
async def intake_world(
    *, reply_to_pattern: str | None = None, delivery_limit: int = 5, deadline_s: float = 5.0
) -> AsyncIterator[World]:
    metrics = Metrics()
    store = MemoryTaskStore(ttl_s=3600)
    publisher = FakePublisher()
    pipeline = FakePipeline()
    reporter = Reporter(publisher, store, metrics, 0.0)  # type: ignore[arg-type]
    settler = Settler(
        store=store,
        reporter=reporter,
        publisher=publisher,  # type: ignore[arg-type]
        metrics=metrics,
        deadline_s=deadline_s,
    )
    dispatcher = Dispatcher(
        pipeline=pipeline,  # type: ignore[arg-type]
        reporter=reporter,
        settler=settler,
        store=store,
        catalog=CATALOG,
        metrics=metrics,
        delivery_limit=delivery_limit,
        leases=Leases(store, "replica-test", 30.0),
    )
    intake = Intake(
        broker=None,  # type: ignore[arg-type]
        topology=Topology("style"),
        dispatcher=dispatcher,
        settler=settler,
        store=store,
        publisher=publisher,  # type: ignore[arg-type]
        replies=ReplyPolicy(reply_to_pattern),
        pool=None,  # type: ignore[arg-type]
        catalog=CATALOG,
        metrics=metrics,
        max_message_bytes=1024 * 1024,
        max_in_flight=10,
        delivery_limit=delivery_limit,
    )
    runner = asyncio.create_task(dispatcher.run())
    try:
        yield World(intake, dispatcher, settler, store, publisher, pipeline, metrics)
    finally:
        if pipeline.hold is not None:
            pipeline.hold.set()
        async with asyncio.timeout(SETTLE_WAIT_S):
            await dispatcher.drain(1.0)
            dispatcher.close()
            await runner
            await settler.close()
