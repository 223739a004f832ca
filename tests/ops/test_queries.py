"""Every PromQL query of the dashboards and alert rules parses, and names only series and labels
that a live replica exports (as Prometheus stores them) or that come from Prometheus or RabbitMQ.

Adding a panel or a rule needs no change here: every query is found in the files. A metric that
needs some traffic to get a labelled child needs a case in `tests/ops/live.py`'s `traffic()`.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import yaml
from promql_parser import MatchOp

from consumer.topology import Topology
from tests.ops.live import Live
from tests.ops.queries import Names, Query, all_queries, dashboard_queries, names
from tests.ops.series import (
    AWAITING_OBSERVATION,
    EXTERNAL,
    declared_without_samples,
    family_of,
    scrape_job,
    stored_labels,
)

# Series families of the replica that no panel shows yet, each with the reason.
NOT_ON_DASHBOARD: dict[str, str] = {}


def test_every_query_parses_with_promtool(promtool, tmp_path):
    """promtool accepts every query, each written as a recording rule."""
    rules = [
        {"record": f"ops_check:query_{i}", "expr": query.expr}
        for i, query in enumerate(all_queries())
    ]
    path = tmp_path / "queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "queries", "rules": rules}]}))
    done = subprocess.run(  # noqa: S603
        [promtool, "check", "rules", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.connected
async def test_queries_name_only_series_and_labels_a_live_replica_exports(live: Live):
    """Each selector's metric and matchers, each by/on label, exist in a live scrape."""
    await live.traffic()
    exposition = await live.metrics_text()
    offered = {**stored_labels(exposition, scrape_job()), **EXTERNAL}
    awaiting = _awaiting(exposition, offered)
    problems = [p for q in all_queries() for p in _problems(q, offered, awaiting)]
    assert problems == []


@pytest.mark.connected
async def test_every_metric_of_a_live_replica_is_on_the_dashboard(live: Live):
    """No series family the replica exports is missing from the dashboards (or NOT_ON_DASHBOARD)."""
    await live.traffic()
    exposition = await live.metrics_text()
    exported = {family_of(n) for n in stored_labels(exposition, scrape_job())}
    exported |= {family_of(n) for n in AWAITING_OBSERVATION}
    shown = {family_of(m) for q in dashboard_queries() for m in names(q.expr).metrics()}
    assert exported - shown - set(NOT_ON_DASHBOARD) == set()
    assert set(NOT_ON_DASHBOARD) - (exported - shown) == set(), "stale NOT_ON_DASHBOARD entries"


def test_queues_named_by_queries_are_queues_of_the_topology():
    """A `queue` matcher names (or, as a regex, matches) a queue the service declares."""
    queues = {spec.name for spec in Topology("style").queues()}
    for query in all_queries():
        for selector in names(query.expr).selectors:
            for label, op, value in selector.matchers:
                if label == "queue" and op in (MatchOp.Equal, MatchOp.Re):  # unhashable
                    pattern = value if op == MatchOp.Re else re.escape(value)
                    assert any(re.fullmatch(pattern, q) for q in queues), (query.where, value)


def _awaiting(exposition: str, offered: dict[str, frozenset[str]]) -> set[str]:
    """AWAITING_OBSERVATION, checked: still declared without a child."""
    declared = declared_without_samples(exposition)
    for metric, wiring in AWAITING_OBSERVATION.items():
        assert metric not in offered, (
            f"{metric} is observed now: remove it from AWAITING_OBSERVATION"
        )
        assert family_of(metric) in declared, f"{metric} is not declared ({wiring})"
    return set(AWAITING_OBSERVATION)


def _problems(query: Query, offered: dict[str, frozenset[str]], awaiting: set[str]) -> list[str]:
    found: Names = names(query.expr)
    problems = []
    for selector in found.selectors:
        if selector.metric in awaiting:
            continue
        if selector.metric not in offered:
            problems.append(f"{query.where}: no series {selector.metric}")
            continue
        unknown = {label for label, _, _ in selector.matchers} - offered[selector.metric]
        problems += [f"{query.where}: {selector.metric} has no label {u}" for u in unknown]
    for use in found.label_uses:
        checked = use.metrics - awaiting
        carried = set().union(*(offered.get(m, frozenset()) for m in checked))
        missing = use.labels - carried if checked else set()
        problems += [f"{query.where}: no {sorted(checked)} has label {m}" for m in missing]
    return problems
