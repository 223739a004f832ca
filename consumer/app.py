"""The service: owns every resource and long-lived loop, and shuts down in phases.

resources (AsyncExitStack)   store, HTTP session, image fetcher, ComfyUI pool, broker,
                             output store (local or S3), sidecar
loops (TaskGroup)            pool health probes, dispatcher (owns the tasks), intake, clean-up
shutdown (on `stop` Event)   stop intake -> drain tasks up to SHUTDOWN_GRACE_S -> interrupt
                             the rest (their deliveries given back: nack) -> wait for settles
                             in progress -> close in reverse order
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from contextlib import AsyncExitStack, asynccontextmanager
from typing import TYPE_CHECKING, Any, TypeVar

from consumer import tracing
from consumer.broker import Broker
from consumer.comfy import InstancePool
from consumer.comfy.membership import InstancesFile, Membership
from consumer.comfy.resolver import DnsResolver
from consumer.decode_budget import DecodeBudget
from consumer.dispatcher import Dispatcher
from consumer.events import EventPublisher, ReplyPolicy
from consumer.fetch import ImageFetcher
from consumer.intake import Intake
from consumer.leases import Leases
from consumer.live_catalog import LiveCatalog
from consumer.logs import ctx
from consumer.metrics import InstanceGauge, MembershipFigures, Metrics
from consumer.outputs import open_output_store
from consumer.pipeline import Pipeline, PipelineConfig
from consumer.reporter import Reporter
from consumer.settle import Settler
from consumer.sidecar import Sidecar, SidecarDeps
from consumer.state import MemoryTaskStore, RedisTaskStore, TaskStateStore
from consumer.storage import LocalOutputStore, OutputStore
from consumer.topology import Topology

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from opentelemetry.trace import TracerProvider
    from prometheus_client import CollectorRegistry

    from consumer.settings import Settings
    from consumer.workflows import StyleCatalog

log = logging.getLogger(__name__)
_T = TypeVar("_T")
CLEANUP_INTERVAL_S = 600.0
SETTLE_MIN_DEADLINE_S = 30.0


class Service:
    """One replica. `await Service(settings).run(stop)` runs until `stop` is set."""

    def __init__(
        self,
        settings: Settings,
        *,
        registry: CollectorRegistry | None = None,
        name: str | None = None,
        tracer_provider: TracerProvider | None = None,  # else OTEL_* settings decide
    ) -> None:
        self.settings = settings
        self._tracer_provider = tracer_provider
        self._tracer = tracing.NO_TRACER
        suffix = uuid.uuid4().hex[:6]  # containers all run as pid 1: the name must still be unique
        self.name = name or f"style-consumer-{socket.gethostname()}-{os.getpid()}-{suffix}"
        self.metrics = Metrics(registry)
        self.metrics.broker_connected.set_function(self._broker_connected)
        self.topology = Topology(settings.amqp_prefix)
        self.styles = LiveCatalog(settings.workflows_dir, self.metrics)  # WorkflowInvalid
        self.ready = asyncio.Event()
        self.sidecar_port: int | None = None
        self._started_at = time.monotonic()
        self._broker: Broker | None = None
        self._pool: InstancePool | None = None
        self._membership: Membership | None = None
        self._intake: Intake | None = None
        self._store: TaskStateStore | None = None
        self._dispatcher: Dispatcher | None = None
        self._settler: Settler | None = None

    def __repr__(self) -> str:
        return f"<Service {self.name!r} {self._dispatcher!r} {self._intake!r}>"

    @property
    def catalog(self) -> StyleCatalog:
        """The style catalog in use (replaced whole by a reload)."""
        return self.styles.current

    def reload_styles(self) -> None:
        """Reload the style catalog now (the SIGHUP handler: it only sets an Event)."""
        self.styles.request_reload()

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop` is set, then shut down in phases."""
        async with AsyncExitStack() as stack:
            await self._open(stack)
            async with asyncio.TaskGroup() as group:
                dispatcher = self._require(self._dispatcher)
                group.create_task(dispatcher.run(), name="dispatcher")
                loops = [
                    group.create_task(self._require(self._pool).run(), name="pool"),
                    group.create_task(self._require(self._intake).run(), name="intake"),
                    group.create_task(self._cleanup_outputs(), name="cleanup"),
                    group.create_task(self._mark_ready(), name="ready"),
                    group.create_task(
                        self.styles.watch(self.settings.workflows_reload_interval_s), name="styles"
                    ),
                ]
                if self._membership is not None:
                    loops.append(group.create_task(self._membership.run(), name="membership"))
                await stop.wait()
                log.info("stopping: intake first, then draining running tasks")
                await self._require(self._intake).stop()
                await dispatcher.drain(self.settings.shutdown_grace_s)
                dispatcher.close()
                await self._require(self._settler).close()
                for task in loops:
                    task.cancel()
        log.info("stopped")

    async def _open(self, stack: AsyncExitStack) -> None:
        s = self.settings
        self._tracer = await stack.enter_async_context(  # first in, so flushed last
            tracing.open_tracer(s, self.name, self._tracer_provider)
        )
        self._store = await stack.enter_async_context(_open_store(s))
        fetcher = await stack.enter_async_context(
            ImageFetcher(
                max_bytes=s.image_max_bytes,
                connect_timeout_s=s.image_connect_timeout_s,
                total_timeout_s=s.image_total_timeout_s,
                max_redirects=s.image_max_redirects,
                allow_private=s.image_url_allow_private,
                allowed_hosts=frozenset(s.image_url_allowed_hosts),
            )
        )
        self._pool = await stack.enter_async_context(_open_pool(s))
        self._membership = _membership(s, self._pool)
        self.metrics.watch_instances(self._instance_gauges)
        self.metrics.watch_membership(self._membership_figures)
        self._broker = await stack.enter_async_context(
            Broker(s.amqp_url.get_secret_value(), heartbeat_s=s.amqp_heartbeat_s, name=self.name)
        )
        outputs = await stack.enter_async_context(open_output_store(s))
        self._wire(fetcher, outputs)
        deps = SidecarDeps(
            view=self,
            store=self._store,
            registry=self.metrics.registry,
            outputs=outputs if isinstance(outputs, LocalOutputStore) else None,  # /outputs
            token=s.sidecar_token.get_secret_value() if s.sidecar_token else None,
        )
        sidecar = await stack.enter_async_context(Sidecar(deps, s.sidecar_host, s.sidecar_port))
        self.sidecar_port = sidecar.port
        self._outputs = outputs

    def _wire(self, fetcher: ImageFetcher, outputs: OutputStore) -> None:
        s = self.settings
        broker, pool, store = (
            self._require(self._broker),
            self._require(self._pool),
            self._require(self._store),
        )
        publisher = EventPublisher(broker.publish_channel, self.topology, s.amqp_publish_timeout_s)
        reporter = Reporter(publisher, store, self.metrics, s.progress_interval_ms / 1000)
        self._settler = Settler(
            store=store,
            reporter=reporter,
            publisher=publisher,
            metrics=self.metrics,
            deadline_s=max(SETTLE_MIN_DEADLINE_S, 3 * s.amqp_publish_timeout_s),
        )
        pipeline = Pipeline(
            PipelineConfig(
                max_side=s.image_max_side,
                max_pixels=s.image_max_pixels,
                max_pixels_full_decode=s.image_max_pixels_full_decode,
                png_level=s.image_png_compress_level,
                max_attempts=s.max_attempts,
                retry_backoff_s=s.retry_backoff_s,
                retry_backoff_max_s=s.retry_backoff_max_s,
                task_timeout_s=s.task_timeout_s,
                execution_timeout_s=s.execution_timeout_s,
                upload_timeout_s=s.output_upload_timeout_s,
            ),
            fetcher=fetcher,
            pool=pool,
            outputs=outputs,
            notify=reporter,
            metrics=self.metrics,
            decode_budget=DecodeBudget(s.image_decode_budget_bytes),
            tracer=self._tracer,
        )
        self._dispatcher = Dispatcher(
            pipeline=pipeline,
            reporter=reporter,
            settler=self._settler,
            store=store,
            catalog=self.styles,
            metrics=self.metrics,
            delivery_limit=s.amqp_delivery_limit,
            leases=Leases(store, self.name, s.lease_ttl_s),
            prompts_adoptable=s.state_backend == "redis",  # a shared record names the prompt
            tracer=self._tracer,
        )
        self._intake = Intake(
            broker=broker,
            topology=self.topology,
            dispatcher=self._dispatcher,
            settler=self._settler,
            store=store,
            publisher=publisher,
            replies=ReplyPolicy(s.reply_to_pattern),
            pool=pool,
            catalog=self.styles,
            metrics=self.metrics,
            max_message_bytes=s.max_message_bytes,
            max_in_flight=s.max_concurrent_tasks,
            delivery_limit=s.amqp_delivery_limit,
            policy=s.scheduler,
            window=s.scheduler_window,
            batch_slice=s.scheduler_batch_slice,
            bulk_poll_s=s.scheduler_bulk_poll_s,
            tracer=self._tracer,
        )

    async def _mark_ready(self) -> None:
        await self._require(self._intake).consuming.wait()
        self.ready.set()
        log.info("ready", extra=ctx(sidecar_port=self.sidecar_port))

    async def _cleanup_outputs(self) -> None:
        max_age_s = self.settings.task_cleanup_hours * 3600
        while True:
            removed = await self._outputs.cleanup(max_age_s)
            if removed:
                log.info("removed %d old output(s)", removed)
            await asyncio.sleep(CLEANUP_INTERVAL_S)

    def _broker_connected(self) -> float:
        return 1.0 if self._broker is not None and self._broker.is_connected else 0.0

    def _instance_gauges(self) -> list[InstanceGauge]:
        pool = self._pool
        if pool is None:
            return []
        return [
            InstanceGauge(st.name, st.in_flight, st.capacity, st.healthy, st.draining)
            for st in pool.stats()
        ]

    def _membership_figures(self) -> MembershipFigures:
        pool, membership = self._pool, self._membership
        return MembershipFigures(
            changes=pool.membership_changes if pool else {},
            sources_ok=membership.sources_ok() if membership else {},
        )

    # ServiceView, for the sidecar

    async def readiness(self) -> dict[str, str | None]:
        broker, intake, pool = self._broker, self._intake, self._pool
        store_ok = self._store is not None and await self._store.ping()
        return {
            "broker": None if broker and broker.is_connected else "broker connection down",
            "consuming": None if intake and intake.consuming.is_set() else "not consuming",
            "comfyui": None
            if pool and pool.healthy_capacity() > 0
            else "no healthy ComfyUI instance",
            "state_store": None if store_ok else "task store unreachable",
        }

    def health(self) -> dict[str, Any]:
        instances = [st.as_dict() for st in self._pool.stats()] if self._pool else []
        healthy = any(i["healthy"] for i in instances)
        return {
            "status": "healthy" if healthy else "degraded",
            "service": self.name,
            "broker_connected": bool(self._broker and self._broker.is_connected),
            "tasks_in_flight": self._dispatcher.in_flight if self._dispatcher else 0,
            "instances": instances,
            "catalog": self.styles.describe(),
        }

    async def stats(self) -> dict[str, Any]:
        counts = await self._require(self._store).counts()
        uptime_s = time.monotonic() - self._started_at
        ended = sum(
            sample.value
            for metric in self.metrics.tasks.collect()
            for sample in metric.samples
            if sample.name.endswith("_total")
        )
        return {
            "tasks": counts,
            "instances": [st.as_dict() for st in self._pool.stats()] if self._pool else [],
            "throughput": {
                "tasks_ended": int(ended),
                "uptime_s": round(uptime_s, 1),
                "tasks_per_minute": round(ended / uptime_s * 60, 2) if uptime_s else 0.0,
            },
        }

    @staticmethod
    def _require(value: _T | None) -> _T:
        if value is None:
            raise RuntimeError("service is not running")
        return value


@asynccontextmanager
async def _open_store(settings: Settings) -> AsyncIterator[TaskStateStore]:
    ttl_s = settings.task_cleanup_hours * 3600
    store: TaskStateStore
    if settings.state_backend == "redis":
        store = RedisTaskStore.from_url(
            settings.redis_url.get_secret_value(), ttl_s=ttl_s, key_prefix=settings.redis_key_prefix
        )
    else:
        store = MemoryTaskStore(ttl_s=ttl_s)
    try:
        yield store
    finally:
        await store.close()


def _open_pool(settings: Settings) -> InstancePool:
    """The pool, with the listed instances; `discover` entries join through `_membership`."""
    return InstancePool(
        [instance for instance in settings.instances() if not instance.discover],
        connect_timeout_s=settings.comfyui_connect_timeout_s,
        request_timeout_s=settings.comfyui_request_timeout_s,
        health_interval_s=settings.comfyui_health_interval_s,
        breaker_max_backoff_s=settings.comfyui_breaker_max_backoff_s,
        ws_reconnect_max_s=settings.comfyui_ws_reconnect_max_s,
        history_wait_s=settings.comfyui_history_wait_s,
        outage_grace_s=settings.comfyui_outage_grace_s,
        ws_heartbeat_s=settings.comfyui_ws_heartbeat_s,
        policy=settings.scheduler,
        load_prior_s=settings.model_load_estimate_s,
        drain_grace_s=settings.comfyui_drain_grace_s,
    )


def _membership(settings: Settings, pool: InstancePool) -> Membership | None:
    """DNS discovery and COMFYUI_INSTANCES_FILE, when in use (else the pool is fixed)."""
    static, path = settings.instances(), settings.comfyui_instances_file
    if path is None and not any(instance.discover for instance in static):
        return None
    return Membership(
        pool,
        static,
        resolver=DnsResolver(settings.comfyui_dns_nameservers, settings.comfyui_dns_timeout_s),
        file=InstancesFile(path, settings.comfyui_max_concurrency) if path else None,
        interval_s=settings.comfyui_discovery_interval_s,
    )
