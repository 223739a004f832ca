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
class Wiring:
    """A dispatcher and its settle point over the memory store and a fake publisher."""

    dispatcher: Dispatcher
    settler: Settler
    reporter: Reporter
    store: MemoryTaskStore
    publisher: FakePublisher
    metrics: Metrics


@asynccontextmanager
async def dispatcher_world(
    pipeline: Any,
    *,
    prompts_adoptable: bool = False,
    delivery_limit: int = 5,
    deadline_s: float = 5.0,
    closing_grace_s: float = 1.0,
) -> AsyncIterator[Wiring]:
    """A running dispatcher whose tasks run `pipeline`; drained and closed at the end."""
    metrics = Metrics()
    store = MemoryTaskStore(ttl_s=3600)
    publisher = FakePublisher()
    reporter = Reporter(publisher, store, metrics, 0.0)  # type: ignore[arg-type]
    settler = Settler(
        store=store,
        reporter=reporter,
        publisher=publisher,  # type: ignore[arg-type]
        metrics=metrics,
        deadline_s=deadline_s,
    )
    dispatcher = Dispatcher(
        pipeline=pipeline,
        reporter=reporter,
        settler=settler,
        store=store,
        catalog=CATALOG,
        metrics=metrics,
        delivery_limit=delivery_limit,
        leases=Leases(store, "replica-test", 30.0),
        prompts_adoptable=prompts_adoptable,
    )
    runner = asyncio.create_task(dispatcher.run())
    try:
        yield Wiring(dispatcher, settler, reporter, store, publisher, metrics)
    finally:
        async with asyncio.timeout(SETTLE_WAIT_S):
            await dispatcher.drain(closing_grace_s)
            dispatcher.close()
            await runner
            await settler.close()


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

    async def deliver_held(self, message: FakeMessage) -> None:
        """Deliver `message` with the pipeline held, and return once its task runs."""
        self.pipeline.hold = asyncio.Event()
        await self.deliver(message, settled=False)
        async with asyncio.timeout(SETTLE_WAIT_S):
            await self.pipeline.started.wait()

    async def cancel(self, message: FakeMessage) -> None:
        await self.intake._on_control(message)  # type: ignore[arg-type]

    def events(self, name: str | None = None) -> list[Any]:
        return self.publisher.events(name)


@asynccontextmanager
async def intake_world(
    *, reply_to_pattern: str | None = None, delivery_limit: int = 5, deadline_s: float = 5.0
) -> AsyncIterator[World]:
    pipeline = FakePipeline()
    wiring = dispatcher_world(pipeline, delivery_limit=delivery_limit, deadline_s=deadline_s)
    async with wiring as w:
        intake = Intake(
            broker=None,  # type: ignore[arg-type]
            topology=Topology("style"),
            dispatcher=w.dispatcher,
            settler=w.settler,
            store=w.store,
            publisher=w.publisher,  # type: ignore[arg-type]
            replies=ReplyPolicy(reply_to_pattern),
            pool=None,  # type: ignore[arg-type]
            catalog=CATALOG,
            metrics=w.metrics,
            max_message_bytes=1024 * 1024,
            max_in_flight=10,
            delivery_limit=delivery_limit,
        )
        world = World(intake, w.dispatcher, w.settler, w.store, w.publisher, pipeline, w.metrics)
        try:
            yield world
        finally:
            if pipeline.hold is not None:
                pipeline.hold.set()
