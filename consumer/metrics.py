"""Every Prometheus metric of the service, bound to an injected registry.

Label sets are bounded: style, status, stage, instance, event, code, kind, priority,
change, source. Never a
task id. A style's version labels only `style_info`, which holds the catalog in use (cleared
on every swap), so it stays one series per style however often the styles are edited.
Instance gauges are read from the pool at scrape time, so they are never stale.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "style_consumer"
STAGE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


@dataclass(frozen=True)
class InstanceGauge:
    """What the pool says of one instance at scrape time."""

    name: str
    in_flight: int
    capacity: int
    healthy: bool
    draining: bool = False


class _InstanceCollector(Collector):
    def __init__(self, read: Callable[[], Iterable[InstanceGauge]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        in_flight = GaugeMetricFamily(
            f"{PREFIX}_instance_in_flight", "Prompts running or staged", labels=["instance"]
        )
        capacity = GaugeMetricFamily(
            f"{PREFIX}_instance_capacity", "Slots of the instance", labels=["instance"]
        )
        healthy = GaugeMetricFamily(
            f"{PREFIX}_instance_healthy", "1 when the instance takes work", labels=["instance"]
        )
        draining = GaugeMetricFamily(
            f"{PREFIX}_instance_draining",
            "1 while the instance, removed from the membership, finishes its prompts",
            labels=["instance"],
        )
        for inst in self._read():
            in_flight.add_metric([inst.name], inst.in_flight)
            capacity.add_metric([inst.name], inst.capacity)
            healthy.add_metric([inst.name], 1.0 if inst.healthy else 0.0)
            draining.add_metric([inst.name], 1.0 if inst.draining else 0.0)
        yield from (in_flight, capacity, healthy, draining)


@dataclass(frozen=True)
class MembershipFigures:
    """What the membership says at scrape time: changes so far, and its sources' health."""

    changes: Mapping[str, int]  # "added" / "removed" -> count since start
    sources_ok: Mapping[str, bool]  # "file" / "dns" -> the last read succeeded


class _MembershipCollector(Collector):
    def __init__(self, read: Callable[[], MembershipFigures]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        figures = self._read()
        changes = CounterMetricFamily(
            f"{PREFIX}_instance_membership_changes",
            "ComfyUI instances that joined (added) or left (removed) the pool",
            labels=["change"],
        )
        for change in ("added", "removed"):
            changes.add_metric([change], figures.changes.get(change, 0))
        sources = GaugeMetricFamily(
            f"{PREFIX}_instance_source_ok",
            "1 when the last read of an instance source (file, dns) succeeded",
            labels=["source"],
        )
        for source, ok in sorted(figures.sources_ok.items()):
            sources.add_metric([source], 1.0 if ok else 0.0)
        yield from (changes, sources)


class Metrics:
    """The metrics container. One per service (and one per test) with its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        reg = self.registry
        self.tasks = Counter(
            f"{PREFIX}_tasks",
            "Tasks ended, by style and final status",
            ["style", "status"],
            registry=reg,
        )
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Duration of each task stage",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=reg,
        )
        self.messages_consumed = Counter(
            f"{PREFIX}_messages_consumed", "Messages taken from the broker", ["kind"], registry=reg
        )
        self.messages_rejected = Counter(
            f"{PREFIX}_messages_rejected", "Messages refused as invalid", ["code"], registry=reg
        )
        self.messages_dead_lettered = Counter(
            f"{PREFIX}_messages_dead_lettered",
            "Messages sent to the dead-letter exchange",
            ["code"],
            registry=reg,
        )
        self.events_published = Counter(
            f"{PREFIX}_events_published", "Events confirmed by the broker", ["event"], registry=reg
        )
        self.retries = Counter(
            f"{PREFIX}_retries", "Task attempts retried after a transient error", registry=reg
        )
        self.replies_refused = Counter(
            f"{PREFIX}_replies_refused",
            "reply_to values ignored: not Direct Reply-to nor REPLY_TO_PATTERN",
            registry=reg,
        )
        self.broker_connected = Gauge(
            f"{PREFIX}_broker_connected", "1 while both broker connections are open", registry=reg
        )
        self.tasks_in_flight = Gauge(
            f"{PREFIX}_tasks_in_flight", "Tasks this replica is running", registry=reg
        )
        self.queue_wait_seconds = Histogram(
            f"{PREFIX}_queue_wait_seconds",
            "Accepted to first start on an instance, by priority class",
            ["priority"],
            buckets=STAGE_BUCKETS_S,
            registry=reg,
        )
        self.model_loads = Counter(
            f"{PREFIX}_model_loads",
            "Model loads instances reported (loader nodes not served from their cache)",
            ["instance"],
            registry=reg,
        )
        self.preemptions = Counter(
            f"{PREFIX}_preemptions",
            "Staged bulk prompts withdrawn to give their place to interactive work",
            registry=reg,
        )
        self.model_load_seconds = Counter(
            f"{PREFIX}_model_load_seconds",
            "Time instances spent loading models for our prompts",
            ["instance"],
            registry=reg,
        )
        self.task_failures = Counter(  # next to `tasks` when a task ends failed: the ratio by code
            f"{PREFIX}_task_failures",
            "Tasks ended failed, by error code",
            ["code"],
            registry=reg,
        )

        # The style catalog. Versions are not a label of `tasks`: every edit makes a new one,
        # and a counter keeps each series it ever had. The info gauge holds only the current
        # versions (join on `style`); per-task versions are in the events and task records.
        self.style_info = Gauge(
            f"{PREFIX}_style_info",
            "1 for each style of the catalog in use, labelled with its version",
            ["style", "version"],
            registry=reg,
        )
        self.catalog_valid = Gauge(
            f"{PREFIX}_catalog_valid",
            "0 while the workflows on disk fail validation (the last good catalog is used)",
            registry=reg,
        )
        self.catalog_loaded_timestamp_seconds = Gauge(
            f"{PREFIX}_catalog_loaded_timestamp_seconds",
            "Unix time the catalog in use was loaded",
            registry=reg,
        )
        self.catalog_reload_errors = Counter(
            f"{PREFIX}_catalog_reload_errors", "Catalog reloads refused as invalid", registry=reg
        )

    def watch_instances(self, read: Callable[[], Iterable[InstanceGauge]]) -> None:
        """Expose the pool's per-instance figures, read at every scrape."""
        self.registry.register(_InstanceCollector(read))

    def watch_membership(self, read: Callable[[], MembershipFigures]) -> None:
        """Expose the pool's membership changes and its sources' health, read at every scrape."""
        self.registry.register(_MembershipCollector(read))
