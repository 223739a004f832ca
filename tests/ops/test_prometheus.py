"""A real Prometheus, configured from deploy/prometheus/, scrapes a live replica while tasks flow:
its counts match what was sent, and every rule and dashboard query runs on what it stored."""

from __future__ import annotations

import json
import time

import pytest
from promql_parser import MatchOp

from tests.ops.live import Live
from tests.ops.prom import PrometheusApi
from tests.ops.queries import Selector, alert_queries, all_queries, names
from tests.ops.series import AWAITING_OBSERVATION, scrape_job, stored_labels

pytestmark = pytest.mark.connected

BURST = 4
COMPLETED = 'style_consumer_tasks_total{status="completed", style="clay"}'
# What the warm-up traffic (one completed, one failed, one poison) leaves, and what a burst
# of BURST completed tasks adds: selector -> (after the warm-up, gained in the burst).
COUNTS = {
    COMPLETED: (1, BURST),
    'style_consumer_tasks_total{status="failed"}': (1, 0),
    'style_consumer_messages_dead_lettered_total{code="invalid_request"}': (1, 0),
    'style_consumer_messages_consumed_total{kind="transform"}': (3, BURST),
    'style_consumer_events_published_total{event="completed"}': (1, BURST),
    'style_consumer_stage_duration_seconds_count{stage="total"}': (2, BURST),
}
_OPS = [(MatchOp.Equal, "="), (MatchOp.NotEqual, "!="), (MatchOp.Re, "=~"), (MatchOp.NotRe, "!~")]


async def _warm_up(live: Live, prometheus: PrometheusApi) -> None:
    """Send the warm-up traffic and wait until Prometheus has scraped all of it."""
    await live.traffic()
    for selector, (count, _) in COUNTS.items():
        await prometheus.wait_for(f"sum({selector})", count)


async def test_increase_of_completed_tasks_equals_the_tasks_sent(live, prometheus):
    """Over the burst, increase() of completed tasks is BURST, and each counter gained its share."""
    await _warm_up(live, prometheus)
    before = time.time()
    await live.complete(BURST)
    for selector, (count, gained) in COUNTS.items():
        await prometheus.wait_for(f"sum({selector})", count + gained)
    after = time.time()

    for selector, (_, gained) in COUNTS.items():
        expr = f"sum({selector}) - sum({selector} @ {before:.3f})"
        assert await prometheus.scalar(expr, at=after) == gained, selector

    # increase() extrapolates to the window's edges: a window that opens 1 ms before the last
    # pre-burst sample and closes on the first post-burst one makes that 1 ms the only error.
    (series,) = await prometheus.query(f"{COMPLETED}[1m]", at=after)
    samples = [(float(ts), float(value)) for ts, value in series["values"]]
    start = max(ts for ts, value in samples if value == 1)
    end = min(ts for ts, value in samples if value == 1 + BURST)
    window_ms = round((end - start) * 1000) + 1
    increase = await prometheus.scalar(f"sum(increase({COMPLETED}[{window_ms}ms]))", at=end)
    assert increase == pytest.approx(BURST, rel=2e-3)


async def test_rules_and_queries_run_on_what_prometheus_stored(live, prometheus):
    """Every rule loads and evaluates, every query runs, selectors match stored series whose
    labels are the ones tests/ops/series.py derives, and ComfyUI gauges carry comfyui_instance."""
    await _warm_up(live, prometheus)

    rules = await prometheus.evaluated_rules()
    assert {rule["name"] for rule in rules} == {q.where.split(": ")[1] for q in alert_queries()}
    assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []

    for query in all_queries():
        await prometheus.query(query.expr)  # raises on a PromQL error
        for selector in names(query.expr).selectors:
            if _ours(selector.metric):
                assert await prometheus.series(_text(selector)), (query.where, _text(selector))

    stored: dict[str, set[str]] = {}
    for series in await prometheus.series('{__name__=~"style_consumer_.+"}'):
        stored.setdefault(series["__name__"], set()).update(set(series) - {"__name__"})
    emulated = stored_labels(await live.metrics_text(), scrape_job())
    assert {name: frozenset(labels) for name, labels in stored.items()} == emulated

    capacity = await prometheus.query("style_consumer_instance_capacity")
    seen = {(s["metric"]["instance"], s["metric"]["comfyui_instance"]) for s in capacity}
    assert seen == {(live.target, "comfy-0"), (live.target, "comfy-1")}


def _ours(metric: str) -> bool:
    """Series the replica or this Prometheus must have (RabbitMQ's and ALERTS may not)."""
    return (metric.startswith("style_consumer_") and metric not in AWAITING_OBSERVATION) or (
        metric == "up"
    )


def _text(selector: Selector) -> str:
    """The selector as PromQL (MatchOp is unhashable: a list, not a dict)."""
    matchers = [
        f"{label}{next(s for o, s in _OPS if o == op)}{json.dumps(value)}"
        for label, op, value in selector.matchers
    ]
    return f"{selector.metric}{{{', '.join(matchers)}}}"
