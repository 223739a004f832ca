"""Fixtures of the ops checks: promtool, a real Prometheus, a live replica with traffic."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.ops.live import Live, live_replica
from tests.ops.prom import PrometheusApi, config_for, prometheus_process

INSTALL_HINT = "Debian's `prometheus` package has it; .ci/run installs it"


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed ({INSTALL_HINT})")
    return path


@pytest.fixture(scope="session")
def promtool() -> str:
    return _binary("promtool")


@pytest.fixture(scope="session")
def prometheus_binary() -> str:
    return _binary("prometheus")


@pytest.fixture
async def live(amqp_url: str, tmp_path: Path) -> AsyncIterator[Live]:
    """A replica on its own topology, two emulated ComfyUI instances, an event subscriber."""
    async with live_replica(amqp_url, tmp_path) as running:
        yield running


@pytest.fixture
def prometheus_url(
    prometheus_binary: str, live: Live, amqp_url: str, tmp_path: Path
) -> Iterator[str]:
    """A Prometheus scraping `live` every second; stopped (never left running) afterwards."""
    workdir = tmp_path / "prometheus"
    workdir.mkdir()
    with prometheus_process(prometheus_binary, config_for(live.target, amqp_url), workdir) as url:
        yield url
    log = (workdir / "prometheus.log").read_text()
    assert "level=error" not in log, log


@pytest.fixture
async def prometheus(prometheus_url: str) -> AsyncIterator[PrometheusApi]:
    """The API of the Prometheus above, once it is ready."""
    async with aiohttp.ClientSession() as http:
        api = PrometheusApi(prometheus_url, http)
        await api.wait_ready()
        yield api
