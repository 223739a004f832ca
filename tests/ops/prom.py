"""A real Prometheus (the Debian package's binary) on loopback, configured from deploy/prometheus/.

Only the targets and the intervals of prometheus.yml are rewritten: the relabelling and the
alert rules are the ones operators run.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import yaml

from tests.ops.queries import PROMETHEUS_DIR, PROMETHEUS_YML
from tests.ops.series import JOB
from tests.ops.waiting import until

SCRAPE_INTERVAL_S = 1
RABBITMQ_PROMETHEUS_PORT = 15692
WAIT_S = 20.0
STOP_S = 10.0


def config_for(target: str, amqp_url: str) -> dict[str, Any]:
    """prometheus.yml with our replica as target, RabbitMQ's on the broker's host, 1 s intervals."""
    config: dict[str, Any] = yaml.safe_load(PROMETHEUS_YML.read_text())
    interval = f"{SCRAPE_INTERVAL_S}s"
    config["global"].update(
        scrape_interval=interval, scrape_timeout=interval, evaluation_interval=interval
    )
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    broker = f"{urlsplit(amqp_url).hostname}:{RABBITMQ_PROMETHEUS_PORT}"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [target if job["job_name"] == JOB else broker]}]
    return config


@contextmanager
def prometheus_process(binary: str, config: dict[str, Any], workdir: Path) -> Iterator[str]:
    """Run Prometheus until the block ends (then stop it, killed if it lingers); yield its URL."""
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    address = f"127.0.0.1:{_free_port()}"
    command = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address={address}",
        "--log.level=warn",
    ]
    with (workdir / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)  # noqa: S603
        try:
            yield f"http://{address}"
        finally:
            process.terminate()
            try:
                process.wait(STOP_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class PrometheusApi:
    """The HTTP API calls the tests make."""

    url: str
    http: aiohttp.ClientSession

    async def wait_ready(self) -> None:
        await until(self._ready, WAIT_S)

    async def _ready(self) -> bool:
        try:
            async with self.http.get(f"{self.url}/-/ready") as response:
                return response.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """The result of an instant query (raises on a PromQL error)."""
        params = {"query": expr} | ({} if at is None else {"time": f"{at:.3f}"})
        data = await self._get("/api/v1/query", params)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def scalar(self, expr: str, at: float | None = None) -> float | None:
        """The value of a one-series query, None when it has no series."""
        result = await self.query(expr, at)
        return float(result[0]["value"][1]) if result else None

    async def wait_for(self, expr: str, expected: float) -> None:
        """Poll until the one-series query `expr` equals `expected`."""

        async def reached() -> bool:
            return await self.scalar(expr) == expected

        await until(reached, WAIT_S)

    async def series(self, selector: str) -> list[dict[str, str]]:
        data: list[dict[str, str]] = await self._get("/api/v1/series", {"match[]": selector})
        return data

    async def evaluated_rules(self) -> list[dict[str, Any]]:
        """The loaded rules, once each has been evaluated (its health is `unknown` before)."""
        rules: list[dict[str, Any]] = []

        async def evaluated() -> bool:
            rules[:] = await self._rules()
            return all(rule["health"] != "unknown" for rule in rules)

        await until(evaluated, WAIT_S)
        return rules

    async def _rules(self) -> list[dict[str, Any]]:
        data = await self._get("/api/v1/rules", {})
        return [rule for group in data["groups"] for rule in group["rules"]]

    async def _get(self, path: str, params: dict[str, str]) -> Any:
        async with self.http.get(f"{self.url}{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", f"{path} {params}: {body}"
        return body["data"]
