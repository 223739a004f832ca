"""The TaskStateStore contract for early cancels and batch completion, run against every store."""

from __future__ import annotations

import asyncio

from consumer.state import MAX_CANCELS_PER_USER, TaskStateStore, task_key
from tests.state.conftest import MakeStore
from tests.state.records import eventually, make_record

CLAIM_TTL_S = 30.0
SHORT_CLAIM_TTL_S = 0.05


async def test_a_cancel_is_remembered_for_its_sender_only(store: TaskStateStore) -> None:
    """cancel_requested is True for the user who cancelled that id, False for anyone else."""
    await store.add_cancel("alice", "t1")
    assert await store.cancel_requested("alice", "t1")
    assert not await store.cancel_requested("bob", "t1")
    assert not await store.cancel_requested("alice", "t2")


async def test_a_cancel_creates_no_record(store: TaskStateStore) -> None:
    """An early cancel squats nothing: no record appears, and any user may still create the id."""
    await store.add_cancel("mallory", "t1")
    assert await store.get(task_key("mallory", "t1")) is None
    assert await store.find("t1") == []
    assert await store.list_for_user("mallory", 10) == []
    assert not any((await store.counts())["by_status"].values())
    assert await store.create(make_record("t1", "alice"))
    assert await store.create(make_record("t1", "mallory"))


async def test_cancelling_again_is_harmless(store: TaskStateStore) -> None:
    """The same cancel twice is still one remembered cancel."""
    await store.add_cancel("alice", "t1")
    await store.add_cancel("alice", "t1")
    assert await store.cancel_requested("alice", "t1")


async def test_each_user_keeps_only_the_newest_cancels(store: TaskStateStore) -> None:
    """Past MAX_CANCELS_PER_USER the oldest cancel goes; other users keep theirs."""
    await store.add_cancel("bob", "t0")
    for n in range(MAX_CANCELS_PER_USER + 1):
        await store.add_cancel("alice", f"t{n}")
    assert not await store.cancel_requested("alice", "t0")
    assert await store.cancel_requested("alice", "t1")
    assert await store.cancel_requested("alice", f"t{MAX_CANCELS_PER_USER}")
    assert await store.cancel_requested("bob", "t0")


async def test_cancels_expire_after_ttl(make_store: MakeStore) -> None:
    """A cancel is forgotten ttl_s after it was made."""
    store = make_store(ttl_s=0.3)
    await store.add_cancel("alice", "t1")
    assert await store.cancel_requested("alice", "t1")

    async def forgotten() -> bool:
        return not await store.cancel_requested("alice", "t1")

    await eventually(forgotten)


async def test_only_the_last_ending_task_announces(store: TaskStateStore) -> None:
    """end_batch_task is False until every task ended, True once, then False while claimed."""
    assert not await store.end_batch_task("b1", "b1-0", 3, CLAIM_TTL_S)
    assert not await store.end_batch_task("b1", "b1-1", 3, CLAIM_TTL_S)
    assert await store.end_batch_task("b1", "b1-2", 3, CLAIM_TTL_S)
    assert not await store.end_batch_task("b1", "b1-2", 3, CLAIM_TTL_S)
    assert not await store.end_batch_task("b1", "b1-0", 3, CLAIM_TTL_S)


async def test_a_task_ending_twice_counts_once(store: TaskStateStore) -> None:
    """A redelivered end does not stand in for another task of the batch."""
    assert not await store.end_batch_task("b1", "b1-0", 2, CLAIM_TTL_S)
    assert not await store.end_batch_task("b1", "b1-0", 2, CLAIM_TTL_S)
    assert await store.end_batch_task("b1", "b1-1", 2, CLAIM_TTL_S)


async def test_batches_are_counted_apart(store: TaskStateStore) -> None:
    """Ends of one batch never complete another."""
    assert not await store.end_batch_task("b1", "t0", 2, CLAIM_TTL_S)
    assert not await store.end_batch_task("b2", "t1", 2, CLAIM_TTL_S)
    assert await store.end_batch_task("b2", "t0", 2, CLAIM_TTL_S)
    assert await store.end_batch_task("b1", "t1", 2, CLAIM_TTL_S)


async def test_per_user_batch_keys_are_counted_apart(store: TaskStateStore) -> None:
    """Batch ids made per user (a "/" inside) keep two users' batches of one id apart."""
    alice, bob = task_key("alice", "b1"), task_key("bob", "b1")
    assert not await store.end_batch_task(alice, "t0", 2, CLAIM_TTL_S)
    assert not await store.end_batch_task(bob, "t1", 2, CLAIM_TTL_S)
    assert await store.end_batch_task(alice, "t1", 2, CLAIM_TTL_S)
    await store.confirm_batch_announced(alice)
    assert await store.end_batch_task(bob, "t0", 2, CLAIM_TTL_S)
    assert not await store.end_batch_task(alice, "t1", 2, CLAIM_TTL_S)


async def test_racing_ends_announce_exactly_once(store: TaskStateStore) -> None:
    """Every task of a batch ending at once (twice each, as racing replicas) gives one True."""
    size = 20
    ends = [store.end_batch_task("b1", f"b1-{i}", size, CLAIM_TTL_S) for i in range(size)]
    again = [store.end_batch_task("b1", f"b1-{i}", size, CLAIM_TTL_S) for i in range(size)]
    results = await asyncio.gather(*ends, *again)
    assert results.count(True) == 1


async def test_a_lapsed_claim_lets_another_caller_announce(store: TaskStateStore) -> None:
    """When the announcer never confirms, a later end announces after claim_ttl_s."""
    assert await store.end_batch_task("b1", "b1-0", 1, SHORT_CLAIM_TTL_S)
    assert not await store.end_batch_task("b1", "b1-0", 1, SHORT_CLAIM_TTL_S)

    async def announced_again() -> bool:
        return await store.end_batch_task("b1", "b1-0", 1, SHORT_CLAIM_TTL_S)

    await eventually(announced_again)


async def test_a_confirmed_announcement_is_never_repeated(store: TaskStateStore) -> None:
    """After confirm_batch_announced the claim outlives claim_ttl_s (shown by a control batch)."""
    assert await store.end_batch_task("done", "t0", 1, SHORT_CLAIM_TTL_S)
    await store.confirm_batch_announced("done")
    assert await store.end_batch_task("control", "t0", 1, SHORT_CLAIM_TTL_S)

    async def control_lapsed() -> bool:
        return await store.end_batch_task("control", "t0", 1, SHORT_CLAIM_TTL_S)

    await eventually(control_lapsed)
    assert not await store.end_batch_task("done", "t0", 1, SHORT_CLAIM_TTL_S)


async def test_batch_bookkeeping_expires_after_ttl(make_store: MakeStore) -> None:
    """ttl_s after a batch's first end its ended tasks are forgotten (they count afresh)."""
    store = make_store(ttl_s=0.3)
    assert not await store.end_batch_task("b1", "b1-0", 2, CLAIM_TTL_S)
    marker = make_record("marker")
    await store.create(marker)  # after that end, same ttl_s, expired by the same (store's) clock

    async def marker_forgotten() -> bool:
        return await store.get(marker.key) is None

    await eventually(marker_forgotten)
    assert not await store.end_batch_task("b1", "b1-1", 2, CLAIM_TTL_S)
