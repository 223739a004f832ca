"""What only the memory store does: expiry on an injected clock, and prune()."""

from __future__ import annotations

from consumer.state.memory import MemoryTaskStore
from tests.state.records import make_record


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


async def test_prune_drops_only_expired_records_and_leases() -> None:
    """prune() removes records and leases past their expiry and keeps the rest."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.create(make_record("old"))
    await store.acquire_lease("old", "w", 10)
    clock.now_s += 30
    await store.create(make_record("new"))
    clock.now_s += 31
    assert store.prune() == 1
    assert await store.get("old") is None
    assert await store.get("new") is not None
    assert await store.lease_owner("old") is None
    assert "records=1 leases=0" in repr(store)


async def test_updates_keep_the_creation_expiry() -> None:
    """An update does not extend a record's life: it still expires ttl_s after creation."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.create(make_record())
    clock.now_s += 59
    assert await store.update("t1", progress=10) is not None
    clock.now_s += 1
    assert await store.get("t1") is None
    assert await store.update("t1", progress=20) is None


async def test_close_is_harmless() -> None:
    """Closing a memory store is a no-op and the store still answers."""
    store = MemoryTaskStore(ttl_s=60)
    await store.close()
    assert await store.ping()
