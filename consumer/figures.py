"""The dashboard's key figures read from a metrics registry, for a terminal (the demo's end).

Quantiles are estimated from histogram buckets the way PromQL's `histogram_quantile` does
(linear within the bucket), so the numbers match what an operator sees in Grafana.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry

from consumer.metrics import PREFIX


@dataclass
class Figures:
    tasks: dict[str, float] = field(default_factory=dict)  # status -> count
    wait_buckets: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    model_loads: float = 0.0
    model_load_s: float = 0.0
    retries: float = 0.0

    @classmethod
    def read(cls, registry: CollectorRegistry) -> Figures:
        figures = cls()
        tasks: dict[str, float] = defaultdict(float)
        buckets: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for metric in registry.collect():
            for sample in metric.samples:
                name, labels, value = sample.name, sample.labels, sample.value
                if name == f"{PREFIX}_tasks_total":
                    tasks[labels["status"]] += value
                elif name == f"{PREFIX}_queue_wait_seconds_bucket":
                    buckets[labels["priority"]].append((float(labels["le"]), value))
                elif name == f"{PREFIX}_model_loads_total":
                    figures.model_loads += value
                elif name == f"{PREFIX}_model_load_seconds_total":
                    figures.model_load_s += value
                elif name == f"{PREFIX}_retries_total":
                    figures.retries += value
        figures.tasks = dict(tasks)
        figures.wait_buckets = {p: sorted(b) for p, b in buckets.items()}
        return figures

    def render(self, elapsed_s: float) -> str:
        ended = sum(self.tasks.values())
        by_status = ", ".join(f"{n:g} {status}" for status, n in sorted(self.tasks.items()))
        lines = [
            "",
            "what the dashboard shows:",
            f"  throughput   {ended / elapsed_s:.2f} tasks/s ({by_status or 'none'})",
        ]
        for priority, buckets in sorted(self.wait_buckets.items()):
            p50, p95 = quantile(0.5, buckets), quantile(0.95, buckets)
            lines.append(f"  queue wait   {priority:<12} p50 {_ms(p50)}  p95 {_ms(p95)}")
        lines.append(
            f"  model loads  {self.model_loads:g} ({self.model_load_s:.1f} s loading)"
            f"   retries {self.retries:g}"
        )
        return "\n".join(lines)


def quantile(q: float, buckets: list[tuple[float, float]]) -> float:
    """`histogram_quantile(q, ...)` over cumulative (upper bound, count) buckets; NaN if empty."""
    if not buckets or buckets[-1][1] == 0:
        return math.nan
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in buckets:
        if count >= rank:
            if math.isinf(upper):
                return lower
            if count == below:
                return upper
            return lower + (upper - lower) * (rank - below) / (count - below)
        lower, below = upper, count
    return lower


def _ms(seconds: float) -> str:
    return "   n/a" if math.isnan(seconds) else f"{seconds * 1000:>5.0f} ms"
