"""Ops checks: alert rules, dashboard and rule queries against a live replica and Prometheus."""
