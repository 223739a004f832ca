"""Every PromQL query of the dashboards and the alert rules, and the series and labels it names.

Queries are parsed with promql-parser (a port of Prometheus's own parser, with a typed AST);
the tests also hand every query to promtool and to a real Prometheus, whose word is final.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import promql_parser
import yaml

DEPLOY = Path(__file__).parents[2] / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
PROMETHEUS_YML = PROMETHEUS_DIR / "prometheus.yml"
ALERTS_YML = PROMETHEUS_DIR / "alerts.yml"
ALERTS_TEST_YML = PROMETHEUS_DIR / "alerts.test.yml"
GRAFANA_DIR = DEPLOY / "grafana"
DASHBOARDS = sorted((GRAFANA_DIR / "dashboards").glob("*.json"))
# Grafana's built-in variables, as a Prometheus that never met Grafana needs them.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "1m", "__range": "1h"}
_VARIABLE = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_LABEL_VALUES = re.compile(r"^label_values\((?P<expr>.+),\s*(?P<label>\w+)\)$", re.DOTALL)


@dataclass(frozen=True)
class Query:
    """One PromQL expression and where it lives (file: alert or panel)."""

    where: str
    expr: str


@dataclass(frozen=True)
class Selector:
    """A vector selector: its metric and its label matchers as (label, op, value)."""

    metric: str
    matchers: tuple[tuple[str, promql_parser.MatchOp, str], ...]


@dataclass(frozen=True)
class LabelUse:
    """Labels named by by/without/on/ignoring/group_x: one of `metrics` must carry each."""

    labels: frozenset[str]
    metrics: frozenset[str]


@dataclass
class Names:
    """What one query names."""

    selectors: list[Selector] = field(default_factory=list)
    label_uses: list[LabelUse] = field(default_factory=list)

    def metrics(self) -> set[str]:
        return {s.metric for s in self.selectors}


def alert_queries() -> list[Query]:
    groups = yaml.safe_load(ALERTS_YML.read_text())["groups"]
    return [
        Query(f"alerts.yml: {rule.get('alert') or rule['record']}", rule["expr"])
        for group in groups
        for rule in group["rules"]
    ]


def dashboard_queries() -> list[Query]:
    return [query for path in DASHBOARDS for query in _dashboard(path)]


def all_queries() -> list[Query]:
    return alert_queries() + dashboard_queries()


def _dashboard(path: Path) -> Iterator[Query]:
    board = json.loads(path.read_text())
    variables = _variable_values(board)
    for panel in _panels(board["panels"]):
        for target in panel.get("targets", []):
            where = f"{path.name}: {panel['title']} ({target['refId']})"
            yield Query(where, _substitute(target["expr"], variables, where))
    for variable in board.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            where = f"{path.name}: variable {variable['name']}"
            yield Query(where, _substitute(_variable_query(variable), variables, where))


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels inside a collapsed row


def _variable_values(board: dict[str, Any]) -> dict[str, str]:
    """What each dashboard variable stands for when "All" is picked."""
    values = dict(GRAFANA_BUILTINS)
    for variable in board.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            values[variable["name"]] = variable["allValue"]
    return values


def _variable_query(variable: dict[str, Any]) -> str:
    """`label_values(expr, label)` as the PromQL Grafana asks: `group by (label) (expr)`."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = _LABEL_VALUES.match(text.strip())
    if match is None:
        raise ValueError(f"variable {variable['name']}: only label_values(expr, label) is known")
    return f"group by ({match['label']}) ({match['expr']})"


def _substitute(expr: str, values: dict[str, str], where: str) -> str:
    def value(match: re.Match[str]) -> str:
        name = match[1] or match[2]
        if name not in values:
            raise ValueError(f"{where}: unknown Grafana variable ${name}")
        return values[name]

    return _VARIABLE.sub(value, expr)


def names(expr: str) -> Names:
    """The selectors and label uses of `expr` (raises ValueError when it does not parse)."""
    found = Names()

    def visit(node: object) -> None:
        match node:
            case promql_parser.VectorSelector():
                found.selectors.append(_selector(node))
            case promql_parser.AggregateExpr(modifier=promql_parser.AggModifier() as modifier):
                _use(found, modifier.labels, node.expr)
            case promql_parser.BinaryExpr(modifier=promql_parser.BinModifier() as modifier):
                matching = list(modifier.matching.labels) if modifier.matching else []
                _use(found, [*matching, *(modifier.group_labels or [])], node)

    promql_parser.walk(promql_parser.parse(expr), pre_visit=visit)
    return found


def _selector(node: promql_parser.VectorSelector) -> Selector:
    if not node.name:
        raise ValueError(f"{node}: name the metric (no bare {{__name__=...}} selectors)")
    matchers = [*node.matchers.matchers, *(m for ors in node.matchers.or_matchers for m in ors)]
    return Selector(node.name, tuple((m.name, m.op, m.value) for m in matchers))


def _use(found: Names, labels: list[str], subtree: promql_parser.Expr) -> None:
    if not labels:
        return
    inner = Names()
    promql_parser.walk(
        subtree,
        pre_visit=lambda n: (
            inner.selectors.append(_selector(n))
            if isinstance(n, promql_parser.VectorSelector)
            else None
        ),
    )
    found.label_uses.append(LabelUse(frozenset(labels), frozenset(inner.metrics())))
