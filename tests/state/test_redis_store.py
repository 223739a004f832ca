"""What only the Redis store does: key TTLs, key prefixes, and an unreachable server."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from consumer.state.redis import RedisTaskStore
from contracts.enums import TaskStatus
from tests.state.records import KEY, make_record


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[Redis]:
    """A plain client on the test database, to look at keys directly."""
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def prefixes(raw_redis: Redis) -> AsyncIterator[list[str]]:
    """Unique key prefixes for this test; their keys are deleted afterwards."""
    made: list[str] = []
    yield made
    for key_prefix in made:
        keys = [key async for key in raw_redis.scan_iter(match=f"{key_prefix}*")]
        if keys:
            await raw_redis.delete(*keys)


def _new_prefix(prefixes: list[str]) -> str:
    key_prefix = f"test-{uuid.uuid4().hex[:12]}:"
    prefixes.append(key_prefix)
    return key_prefix


@pytest.mark.connected
async def test_every_key_expires_and_updates_keep_the_ttl(
    redis_url: str, raw_redis: Redis, prefixes: list[str]
) -> None:
    """Record and index keys carry a TTL of at most ttl_s; an update does not reset it."""
    key_prefix = _new_prefix(prefixes)
    store = RedisTaskStore.from_url(redis_url, ttl_s=100, key_prefix=key_prefix)
    try:
        await store.create(make_record())
        await raw_redis.pexpire(f"{key_prefix}task:u1/t1", 50_000)
        await store.update(KEY, status=TaskStatus.PROCESSING, progress=10)
        assert 0 < await raw_redis.pttl(f"{key_prefix}task:u1/t1") <= 50_000
        keys = [key async for key in raw_redis.scan_iter(match=f"{key_prefix}*")]
        assert f"{key_prefix}ids:t1" in keys
        assert len(keys) >= 6
        for key in keys:
            assert 0 < await raw_redis.pttl(key) <= 100_000, key
    finally:
        await store.close()


@pytest.mark.connected
async def test_key_prefixes_isolate_stores(redis_url: str, prefixes: list[str]) -> None:
    """Two stores with different prefixes on one database never see each other's tasks."""
    first = RedisTaskStore.from_url(redis_url, ttl_s=100, key_prefix=_new_prefix(prefixes))
    second = RedisTaskStore.from_url(redis_url, ttl_s=100, key_prefix=_new_prefix(prefixes))
    try:
        await first.create(make_record())
        assert await second.get(KEY) is None
        assert await second.find("t1") == []
        assert await second.create(make_record())
        assert (await second.counts())["by_status"]["pending"] == 1
        assert "prefix=" in repr(first)
    finally:
        await first.close()
        await second.close()


async def test_ping_is_false_when_redis_is_unreachable() -> None:
    """An unreachable server makes ping() answer False instead of raising."""
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    store = RedisTaskStore.from_url(f"redis://127.0.0.1:{port}/0", ttl_s=1, connect_timeout_s=1)
    try:
        assert not await store.ping()
    finally:
        await store.close()


@pytest.mark.connected
async def test_works_on_a_client_that_returns_bytes(redis_url: str, prefixes: list[str]) -> None:
    """A store built on a caller's client without decode_responses reads and lists alike."""
    store = RedisTaskStore(Redis.from_url(redis_url), ttl_s=100, key_prefix=_new_prefix(prefixes))
    try:
        record = make_record()
        await store.create(record)
        await store.acquire_lease(KEY, "worker-a", 30)
        assert await store.get(KEY) == record
        assert await store.list_for_user("u1", 5) == [record]
        assert await store.find("t1") == [record]
        assert await store.lease_owner(KEY) == "worker-a"
        assert (await store.counts())["by_style"] == {"clay": 1}
        assert await store.update(KEY, progress=5) is not None
        await store.add_cancel("u1", "t2")
        assert await store.cancel_requested("u1", "t2")
        assert await store.end_batch_task("b1", "b1-0", 1, 5)
    finally:
        await store.close()


@pytest.mark.connected
async def test_keys_hold_the_user_and_task_id(
    redis_url: str, raw_redis: Redis, prefixes: list[str]
) -> None:
    """Record and lease keys are <user_id>/<task_id>; the indexes hold those keys."""
    key_prefix = _new_prefix(prefixes)
    store = RedisTaskStore.from_url(redis_url, ttl_s=100, key_prefix=key_prefix)
    try:
        record = make_record()
        await store.create(record)
        await store.acquire_lease(KEY, "worker-a", 30)
        assert await raw_redis.get(f"{key_prefix}task:u1/t1") == record.model_dump_json()
        assert await raw_redis.get(f"{key_prefix}lease:u1/t1") == "worker-a"
        for index in ["user:u1", "ids:t1", "status:pending", "style:clay"]:
            assert await raw_redis.zrange(f"{key_prefix}{index}", 0, -1) == ["u1/t1"], index
    finally:
        await store.close()


@pytest.mark.connected
async def test_cancel_and_batch_keys_expire(
    redis_url: str, raw_redis: Redis, prefixes: list[str]
) -> None:
    """Cancel and batch keys carry a TTL: ttl_s at most, the claim claim_ttl_s until confirmed."""
    key_prefix = _new_prefix(prefixes)
    store = RedisTaskStore.from_url(redis_url, ttl_s=100, key_prefix=key_prefix)
    try:
        await store.add_cancel("u1", "t1")
        assert await store.end_batch_task("b1", "b1-0", 1, 5)
        assert 0 < await raw_redis.pttl(f"{key_prefix}batch-claim:b1") <= 5_000
        await store.confirm_batch_announced("b1")
        assert 5_000 < await raw_redis.pttl(f"{key_prefix}batch-claim:b1") <= 100_000
        keys = [key async for key in raw_redis.scan_iter(match=f"{key_prefix}*")]
        assert len(keys) == 3
        for key in keys:
            assert 0 < await raw_redis.pttl(key) <= 100_000, key
    finally:
        await store.close()
