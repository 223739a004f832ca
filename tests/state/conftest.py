"""The shared TaskStateStore suite runs once per store: memory, and Redis (connected)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime

import pytest
from redis.asyncio import Redis

from consumer.state import TaskStateStore
from consumer.state.memory import MemoryTaskStore
from consumer.state.redis import RedisTaskStore
from tests.state import records

MakeStore = Callable[..., TaskStateStore]


@pytest.fixture(autouse=True)
def _fresh_base_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Records are created "now" for each test: the store trims index entries older than its
    TTL, so a base time taken at import goes stale when the suite runs for minutes."""
    monkeypatch.setattr(records, "BASE_TIME", datetime.now(UTC))


DAY_S = 24 * 3600.0


async def _delete_prefix(redis_url: str, key_prefix: str) -> None:
    client = Redis.from_url(redis_url)
    try:
        keys = [key async for key in client.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.connected)])
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """A factory of stores of one kind (`ttl_s` per store); Redis ones get a unique key prefix."""
    stores: list[TaskStateStore] = []
    redis_url: str | None = (
        request.getfixturevalue("redis_url") if request.param == "redis" else None
    )
    key_prefix = f"test-{uuid.uuid4().hex[:12]}:"

    def make(ttl_s: float = DAY_S) -> TaskStateStore:
        store: TaskStateStore = (
            MemoryTaskStore(ttl_s=ttl_s)
            if redis_url is None
            else RedisTaskStore.from_url(redis_url, ttl_s=ttl_s, key_prefix=key_prefix)
        )
        stores.append(store)
        return store

    yield make
    for store in reversed(stores):
        await store.close()
    if redis_url is not None:
        await _delete_prefix(redis_url, key_prefix)


@pytest.fixture
def store(make_store: MakeStore) -> TaskStateStore:
    """A store of the current kind whose records live a day."""
    return make_store()
