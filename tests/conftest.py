"""Shared fixtures: a clean environment, a real RabbitMQ, unique names per test."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from consumer.settings import Settings

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/15"
_SETTING_NAMES = {name.upper() for name in Settings.model_fields}


@pytest.fixture(autouse=True)
def _clean_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    """Keep tests free of ambient settings: no env var of ours leaks in."""
    for name in list(os.environ):
        if name.upper() in _SETTING_NAMES:
            monkeypatch.delenv(name)


def _reachable(url: str) -> bool:
    parts = urlsplit(url)
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 5672), 2):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A real broker: the local one (or TEST_AMQP_URL); testcontainers when none is up."""
    url = os.environ.get("TEST_AMQP_URL", DEFAULT_AMQP_URL)
    if _reachable(url):
        yield url
        return
    from testcontainers.rabbitmq import RabbitMqContainer  # a developer machine without a broker

    with RabbitMqContainer("rabbitmq:3.13-management") as container:
        params = container.get_connection_params()
        yield f"amqp://guest:guest@{params.host}:{params.port}/"


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A real Redis (database 15, flushed by the tests that use it)."""
    return os.environ.get("TEST_REDIS_URL", DEFAULT_REDIS_URL)


@pytest.fixture
def prefix() -> str:
    """A unique AMQP_PREFIX so tests never share exchanges or queues."""
    return f"t{uuid.uuid4().hex[:12]}"
