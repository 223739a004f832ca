"""What only the memory store does: expiry on an injected clock, its indexes, and prune()."""

from __future__ import annotations

from consumer.state import task_key
from consumer.state.memory import MemoryTaskStore
from contracts.enums import TaskStatus
from tests.state.records import KEY, make_record


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
    old, new = task_key("u1", "old"), task_key("u1", "new")
    await store.create(make_record("old"))
    await store.acquire_lease(old, "w", 10)
    clock.now_s += 30
    await store.create(make_record("new"))
    clock.now_s += 31
    assert store.prune() == 1
    assert await store.get(old) is None
    assert await store.get(new) is not None
    assert await store.lease_owner(old) is None
    assert "records=1 leases=0" in repr(store)


async def test_updates_keep_the_creation_expiry() -> None:
    """An update does not extend a record's life: it still expires ttl_s after creation."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.create(make_record())
    clock.now_s += 59
    assert await store.update(KEY, progress=10) is not None
    clock.now_s += 1
    assert await store.get(KEY) is None
    assert await store.update(KEY, progress=20) is None


async def test_close_is_harmless() -> None:
    """Closing a memory store is a no-op and the store still answers."""
    store = MemoryTaskStore(ttl_s=60)
    await store.close()
    assert await store.ping()


async def test_counts_and_lists_follow_expiry_and_updates() -> None:
    """Counters and the per-user index drop expired records and follow status/style changes."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.create(make_record("a1", "alice", order=1))
    await store.create(make_record("b1", "bob", order=2, style_type="anime"))
    clock.now_s += 30
    await store.create(make_record("a2", "alice", order=3))
    await store.update(task_key("alice", "a2"), status=TaskStatus.PROCESSING, style_type="anime")
    clock.now_s += 30  # a1 and b1 expire now
    assert [r.task_id for r in await store.list_for_user("alice", 10)] == ["a2"]
    assert await store.list_for_user("bob", 10) == []
    counts = await store.counts()
    assert counts["by_status"] == {
        "pending": 0, "processing": 1, "completed": 0, "failed": 0, "cancelled": 0,
    }  # fmt: skip
    assert counts["by_style"] == {"anime": 1}
    assert "records=1" in repr(store)


async def test_a_task_id_reused_after_expiry_is_indexed_afresh() -> None:
    """A record created again under an expired id is listed and counted once."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.create(make_record("t1", order=1))
    clock.now_s += 60
    assert await store.create(make_record("t1", order=2, style_type="anime"))
    assert [r.style_type for r in await store.list_for_user("u1", 10)] == ["anime"]
    assert (await store.counts())["by_style"] == {"anime": 1}


async def test_find_drops_each_record_as_it_expires() -> None:
    """find(task_id) keeps the live records of the id and loses each one at its expiry."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.create(make_record("t1", "alice", order=1))
    clock.now_s += 30
    await store.create(make_record("t1", "bob", order=2))
    clock.now_s += 30  # alice's expires now
    assert [r.user_id for r in await store.find("t1")] == ["bob"]
    assert await store.create(make_record("t1", "alice", order=3))
    assert [r.user_id for r in await store.find("t1")] == ["bob", "alice"]
    clock.now_s += 60
    assert await store.find("t1") == []
    assert "records=0" in repr(store)


async def test_early_cancels_have_a_global_bound() -> None:
    """Past max_cancels in all, the oldest cancel (of any user) is dropped."""
    store = MemoryTaskStore(ttl_s=60, max_cancels=3)
    for user in ["u1", "u2", "u3", "u4"]:
        await store.add_cancel(user, "t1")
    assert not await store.cancel_requested("u1", "t1")
    assert await store.cancel_requested("u4", "t1")
    assert "cancels=3" in repr(store)


async def test_a_renewed_cancel_lives_from_its_renewal() -> None:
    """Cancelling the same task again restarts its ttl_s."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.add_cancel("u1", "t1")
    clock.now_s += 40
    await store.add_cancel("u1", "t1")
    clock.now_s += 40
    assert await store.cancel_requested("u1", "t1")
    clock.now_s += 20
    assert not await store.cancel_requested("u1", "t1")
    assert "cancels=0" in repr(store)


async def test_batches_expire_ttl_s_after_their_first_end_or_confirmation() -> None:
    """A batch is forgotten ttl_s after its first end; a confirmation keeps it ttl_s more."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    assert await store.end_batch_task("b1", "t0", 1, 5)
    await store.end_batch_task("b2", "t0", 2, 5)
    clock.now_s += 30
    await store.confirm_batch_announced("b1")
    clock.now_s += 30  # b2 expires, b1 was confirmed 30 s ago
    store.prune()
    assert "batches=1" in repr(store)
    assert not await store.end_batch_task("b1", "t0", 1, 5)
    assert not await store.end_batch_task("b2", "t1", 2, 5)
    clock.now_s += 30
    assert await store.end_batch_task("b1", "t0", 1, 5)


async def test_renewed_leases_outlive_their_first_expiry() -> None:
    """A lease renewed before it expired survives its first expiry time; then it goes."""
    clock = FakeClock()
    store = MemoryTaskStore(ttl_s=60, clock=clock)
    await store.acquire_lease(KEY, "w", 10)
    clock.now_s += 5
    await store.renew_lease(KEY, "w", 10)
    clock.now_s += 6
    assert await store.lease_owner(KEY) == "w"
    clock.now_s += 4
    assert await store.lease_owner(KEY) is None
    assert "leases=0" in repr(store)
