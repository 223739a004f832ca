"""The series Prometheus stores from a scrape of a live replica, by the rules of prometheus.yml.

A scraped label that clashes with a target label (`instance`) is renamed `exported_<name>`, then
the job's metric_relabel_configs run. Only what prometheus.yml uses is emulated (replace with
the default regex, labeldrop); the test against a real Prometheus checks the emulation.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.ops.queries import PROMETHEUS_YML

JOB = "style-consumer"
TARGET_LABELS = frozenset({"job", "instance"})
# Series that do not come from the replica, with the labels the queries may use. `up` is
# Prometheus's own per target; ALERTS is its alert state. The rabbitmq_detailed_* series come
# from RabbitMQ's rabbitmq_prometheus plugin, /metrics/detailed?family=queue_coarse_metrics
# (names and labels from RabbitMQ's documentation: our broker in tests runs without the plugin).
EXTERNAL: dict[str, frozenset[str]] = {
    "up": TARGET_LABELS,
    "ALERTS": frozenset({"alertname", "alertstate", "severity"}),
    "rabbitmq_detailed_queue_messages_ready": TARGET_LABELS | {"vhost", "queue"},
    "rabbitmq_detailed_queue_messages": TARGET_LABELS | {"vhost", "queue"},
}
# Declared in consumer/metrics.py but observed by no code yet: their labels cannot be read
# from a live scrape. The tests fail once one has samples, to have it removed from here.
AWAITING_OBSERVATION: dict[str, str] = {
    "style_consumer_instance_source_ok": "a sample per source only with COMFYUI_INSTANCES_FILE "
    "or a `discover` entry, which the live replica of these tests does not use",
}
_SUFFIXES = ("_total", "_bucket", "_count", "_sum", "_created")


def scrape_job() -> dict[str, Any]:
    """The style-consumer scrape job of prometheus.yml."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs: list[dict[str, Any]] = [j for j in config["scrape_configs"] if j["job_name"] == JOB]
    (job,) = jobs
    return job


def stored_labels(exposition: str, job: dict[str, Any]) -> dict[str, frozenset[str]]:
    """Label names per series name, as Prometheus stores a scrape of `exposition` by `job`."""
    scraped: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            scraped.setdefault(sample.name, set()).update(sample.labels)
    rules = job.get("metric_relabel_configs", [])
    return {name: _relabel(labels, rules) for name, labels in scraped.items()}


def declared_without_samples(exposition: str) -> set[str]:
    """Families the replica declares (HELP, TYPE) but has no sample of: labelled, no child yet."""
    return {f.name for f in text_string_to_metric_families(exposition) if not f.samples}


def family_of(series: str) -> str:
    """`style_consumer_tasks_total` -> `style_consumer_tasks` (histograms and counters alike)."""
    for suffix in _SUFFIXES:
        if series.endswith(suffix):
            return series.removesuffix(suffix)
    return series


def _relabel(scraped: set[str], rules: list[dict[str, Any]]) -> frozenset[str]:
    labels = {f"exported_{n}" if n in TARGET_LABELS else n for n in scraped} | TARGET_LABELS
    for rule in rules:
        labels = _apply(rule, labels)
    return frozenset(labels)


def _apply(rule: dict[str, Any], labels: set[str]) -> set[str]:
    action = rule.get("action", "replace")
    if action == "labeldrop":
        return {n for n in labels if not re.fullmatch(rule["regex"], n)}
    default = rule.get("regex", "(.*)") == "(.*)" and rule.get("replacement", "$1") == "$1"
    if action == "replace" and default:
        present = set(rule["source_labels"]) <= labels
        return labels | {rule["target_label"]} if present else labels
    msg = f"relabel rule {rule} is not emulated: teach tests/ops/series.py"
    raise NotImplementedError(msg)
