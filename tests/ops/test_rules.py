"""The alert rules pass promtool, every rule has firing and quiet unit tests, the compose file
mounts what prometheus.yml and Grafana's provisioning expect, and dashboards import anywhere."""

from __future__ import annotations

import json
import subprocess
from pathlib import PurePosixPath

import yaml

from tests.ops.queries import (
    ALERTS_TEST_YML,
    ALERTS_YML,
    DASHBOARDS,
    DEPLOY,
    GRAFANA_DIR,
    PROMETHEUS_DIR,
    PROMETHEUS_YML,
    alert_queries,
)

COMPOSE = DEPLOY / "docker-compose.yml"


def _promtool(promtool: str, *args: str) -> str:
    done = subprocess.run(  # noqa: S603
        [promtool, *args],
        cwd=PROMETHEUS_DIR,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_rules_and_the_config(promtool):
    """`promtool check rules` accepts alerts.yml and `check config` prometheus.yml with it."""
    out = _promtool(promtool, "check", "rules", ALERTS_YML.name)
    assert f"SUCCESS: {len(alert_queries())} rules found" in out
    _promtool(promtool, "check", "config", PROMETHEUS_YML.name)


def test_promtool_unit_tests_of_the_rules_pass(promtool):
    """`promtool test rules alerts.test.yml` passes: each alert fires and stays quiet as tested."""
    assert "SUCCESS" in _promtool(promtool, "test", "rules", ALERTS_TEST_YML.name)


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    """Each rule of alerts.yml is expected to fire somewhere and to stay quiet somewhere."""
    alerts = {q.where.removeprefix("alerts.yml: ") for q in alert_queries()}
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST_YML.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fires = {c["alertname"] for c in cases if c.get("exp_alerts")}
    quiet = {c["alertname"] for c in cases if not c.get("exp_alerts")}
    assert {c["alertname"] for c in cases} <= alerts, "a test names an unknown alert"
    assert alerts - fires == set(), "alerts never expected to fire"
    assert alerts - quiet == set(), "alerts never expected to stay quiet"


def test_compose_mounts_the_rules_and_grafana_provisioning():
    """Prometheus gets each rule file beside its config; Grafana its provisioning and dashboards."""
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    prometheus = _mounts(services["prometheus"])
    config = PurePosixPath(prometheus["./prometheus/prometheus.yml"])
    for name in yaml.safe_load(PROMETHEUS_YML.read_text())["rule_files"]:
        assert prometheus.get(f"./prometheus/{name}") == str(config.parent / name)

    grafana = _mounts(services["grafana"])
    assert grafana["./grafana/provisioning"] == "/etc/grafana/provisioning"
    provider = yaml.safe_load(
        (GRAFANA_DIR / "provisioning/dashboards/style-consumer.yml").read_text()
    )
    assert grafana["./grafana/dashboards"] == provider["providers"][0]["options"]["path"]
    datasource = yaml.safe_load(
        (GRAFANA_DIR / "provisioning/datasources/prometheus.yml").read_text()
    )
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
    for host_path in grafana:
        assert (DEPLOY / host_path).is_dir(), host_path


def test_dashboards_pick_prometheus_through_their_datasource_variable():
    """Panels and targets use the `datasource` variable (the JSON imports anywhere); unique ids."""
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        names = {v["name"] for v in board["templating"]["list"] if v["type"] == "datasource"}
        assert names == {"datasource"}, path.name
        panels = [p for p in board["panels"] if p["type"] != "row"]
        uids = {x["datasource"]["uid"] for p in panels for x in [p, *p["targets"]]}
        assert uids == {"${datasource}"}, path.name
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name


def _mounts(service: dict[str, list[str]]) -> dict[str, str]:
    """host path -> container path of a service's bind mounts."""
    return dict(volume.removesuffix(":ro").split(":", 1) for volume in service["volumes"])
