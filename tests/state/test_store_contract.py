"""The TaskStateStore contract, run against every store (memory, and Redis when connected)."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from consumer.state import TaskStateStore, task_key, utcnow
from contracts.enums import ErrorCode, TaskStatus
from contracts.models import TaskError
from tests.state.conftest import MakeStore
from tests.state.records import KEY, eventually, make_record

COMPLETED = {
    "status": TaskStatus.COMPLETED,
    "progress": 100,
    "output_image_url": "http://out/t1.png",
    "terminal_event": '{"event": "completed"}',
}


async def test_create_then_get_round_trips_every_field(store: TaskStateStore) -> None:
    """A created record reads back equal, nested error, timings and metadata included."""
    record = make_record(
        seed=2**63,
        style_version="0123456789ab",
        batch_id="b1",
        batch_index=3,
        instance="gpu-1",
        prompt_id="p1",
        output_image_urls=["http://a", "http://b"],
        error=TaskError(code=ErrorCode.TIMEOUT, message="slow", retriable=False),
        timings_ms={"download": 12, "execute": 3400},
        metadata={"k": [1, {"x": None}]},
        terminal_event='{"a": 1}',
    )
    assert await store.create(record)
    assert await store.get(KEY) == record


async def test_get_of_unknown_task_is_none(store: TaskStateStore) -> None:
    """Reading a key that was never stored gives None."""
    assert await store.get(task_key("u1", "missing")) is None


async def test_duplicate_create_keeps_the_first(store: TaskStateStore) -> None:
    """Creating an existing key returns False and leaves the stored record alone."""
    assert await store.create(make_record(seed=1))
    assert not await store.create(make_record(seed=2, style_type="anime"))
    stored = await store.get(KEY)
    assert stored is not None
    assert (stored.seed, stored.style_type) == (1, "clay")
    assert [r.seed for r in await store.list_for_user("u1", 10)] == [1]
    assert (await store.counts())["by_style"] == {"clay": 1}


async def test_two_users_keep_the_same_task_id_apart(store: TaskStateStore) -> None:
    """Records of one task id under two users live apart: read, updated and listed apiece."""
    alice = make_record("t1", "alice", seed=1)
    bob = make_record("t1", "bob", seed=2)
    assert await store.create(alice)
    assert await store.create(bob)
    assert await store.get(alice.key) == alice
    assert await store.get(bob.key) == bob
    updated = await store.update(alice.key, status=TaskStatus.PROCESSING, progress=30)
    assert updated is not None
    assert await store.get(bob.key) == bob
    assert await store.list_for_user("alice", 10) == [updated]
    assert await store.list_for_user("bob", 10) == [bob]
    assert (await store.counts())["by_status"]["pending"] == 1


async def test_find_returns_every_users_record_oldest_first(store: TaskStateStore) -> None:
    """find(task_id) gives the records of all users with that id, oldest first, up to limit."""
    for user_id, order in [("bob", 2), ("alice", 1), ("carol", 3)]:
        await store.create(make_record("t1", user_id, order=order))
    await store.create(make_record("t2", "alice", order=4))
    await store.update(task_key("bob", "t1"), progress=7)
    found = await store.find("t1")
    assert [(r.user_id, r.task_id) for r in found] == [
        ("alice", "t1"), ("bob", "t1"), ("carol", "t1"),
    ]  # fmt: skip
    assert found[1].progress == 7
    assert [r.user_id for r in await store.find("t1", limit=2)] == ["alice", "bob"]
    assert await store.find("t1", limit=0) == []
    assert [r.key for r in await store.find("t2")] == [task_key("alice", "t2")]


async def test_find_of_an_unknown_task_id_is_empty(store: TaskStateStore) -> None:
    """A task id no user has a record for finds nothing."""
    await store.create(make_record("t1"))
    assert await store.find("t2") == []


async def test_find_forgets_expired_records(make_store: MakeStore) -> None:
    """Expired records drop out of find; a new record of the id is found alone."""
    store = make_store(ttl_s=0.5)
    await store.create(make_record("t1", "alice", created_at=utcnow()))
    await store.create(make_record("t1", "bob", created_at=utcnow()))
    assert len(await store.find("t1")) == 2

    async def none_found() -> bool:
        return await store.find("t1") == []

    await eventually(none_found)
    carol = make_record("t1", "carol", created_at=utcnow())
    assert await store.create(carol)
    assert await store.find("t1") == [carol]


async def test_update_changes_fields_and_stamps_updated_at(store: TaskStateStore) -> None:
    """An update returns and stores the new record with a fresh updated_at."""
    record = make_record()
    await store.create(record)
    updated = await store.update(KEY, status=TaskStatus.PROCESSING, instance="gpu-2", attempt=1)
    assert updated is not None
    assert (updated.status, updated.instance, updated.attempt) == (
        TaskStatus.PROCESSING, "gpu-2", 1,
    )  # fmt: skip
    assert updated.updated_at > record.updated_at
    assert updated.created_at == record.created_at
    assert await store.get(KEY) == updated


async def test_update_of_unknown_task_is_none(store: TaskStateStore) -> None:
    """Updating a task that does not exist changes nothing and returns None."""
    assert await store.update(task_key("u1", "missing"), progress=5) is None
    assert await store.get(task_key("u1", "missing")) is None


async def test_update_accepts_error_as_a_dict(store: TaskStateStore) -> None:
    """An error given as its JSON dict is validated into a TaskError."""
    await store.create(make_record())
    error = {"code": "comfyui_rejected", "message": "bad node", "retriable": False}
    updated = await store.update(KEY, status=TaskStatus.FAILED, error=error)
    assert updated is not None
    assert updated.error == TaskError(
        code=ErrorCode.COMFYUI_REJECTED, message="bad node", retriable=False
    )


async def test_update_sets_the_style_version(store: TaskStateStore) -> None:
    """A redelivered task runs with the catalog in use: its record takes the new version."""
    await store.create(make_record(style_version="0123456789ab"))
    updated = await store.update(KEY, status=TaskStatus.PROCESSING, style_version="ba9876543210")
    assert updated is not None
    stored = await store.get(KEY)
    assert stored is not None
    assert stored.style_version == "ba9876543210"


async def test_update_refuses_bad_fields(store: TaskStateStore) -> None:
    """Unknown fields, invalid values and identity fields are programming errors."""
    await store.create(make_record())
    with pytest.raises(ValidationError):
        await store.update(KEY, colour="red")
    with pytest.raises(ValidationError):
        await store.update(KEY, progress=101)
    with pytest.raises(ValueError, match="user_id cannot change"):
        await store.update(KEY, user_id="u2")


@pytest.mark.parametrize("final", [TaskStatus.COMPLETED, TaskStatus.FAILED, TaskStatus.CANCELLED])
async def test_terminal_task_never_changes(store: TaskStateStore, final: TaskStatus) -> None:
    """Once terminal, no update goes through: status, progress and outputs stay as they were."""
    await store.create(make_record())
    ended = await store.update(KEY, status=final, terminal_event="{}")
    assert ended is not None
    assert await store.update(KEY, status=TaskStatus.PROCESSING) is None
    assert await store.update(KEY, terminal_event='{"other": 1}') is None
    assert await store.update(KEY, attempt=5) is None
    assert await store.get(KEY) == ended


async def test_same_terminal_data_again_is_an_idempotent_no_op(store: TaskStateStore) -> None:
    """Re-setting exactly the stored terminal data returns the stored record unchanged."""
    await store.create(make_record())
    ended = await store.update(KEY, **COMPLETED)
    assert ended is not None
    assert await store.update(KEY, **COMPLETED) == ended
    assert await store.update(KEY, status=TaskStatus.COMPLETED) == ended
    assert await store.update(KEY, **(COMPLETED | {"output_image_url": "http://other"})) is None


async def test_cancelling_a_completed_task_is_refused(store: TaskStateStore) -> None:
    """A late cancel cannot overwrite a completion (completed stays completed)."""
    await store.create(make_record())
    await store.update(KEY, **COMPLETED)
    assert await store.update(KEY, status=TaskStatus.CANCELLED) is None
    stored = await store.get(KEY)
    assert stored is not None
    assert stored.status is TaskStatus.COMPLETED


async def test_progress_never_goes_down_within_an_attempt(store: TaskStateStore) -> None:
    """A late lower progress is ignored; the higher value stays."""
    await store.create(make_record(attempt=1))
    await store.update(KEY, progress=60)
    late = await store.update(KEY, progress=30)
    assert late is not None
    assert late.progress == 60
    stored = await store.get(KEY)
    assert stored is not None
    assert stored.progress == 60


async def test_new_attempt_starts_progress_again(store: TaskStateStore) -> None:
    """A higher attempt resets progress to 0, or to the value it brings."""
    await store.create(make_record(attempt=1))
    await store.update(KEY, progress=80)
    retried = await store.update(KEY, attempt=2)
    assert retried is not None
    assert (retried.attempt, retried.progress) == (2, 0)
    await store.update(KEY, progress=40)
    third = await store.update(KEY, attempt=3, progress=10)
    assert third is not None
    assert (third.attempt, third.progress) == (3, 10)


async def test_older_attempt_is_refused(store: TaskStateStore) -> None:
    """An update from an earlier attempt (a stale writer) is refused."""
    await store.create(make_record(attempt=2))
    assert await store.update(KEY, attempt=1, progress=90) is None
    stored = await store.get(KEY)
    assert stored is not None
    assert (stored.attempt, stored.progress) == (2, 0)


async def test_concurrent_updates_all_apply(store: TaskStateStore) -> None:
    """Racing progress updates never lose the highest value."""
    await store.create(make_record(attempt=1))
    await asyncio.gather(*(store.update(KEY, progress=p) for p in [5, 90, 40, 70, 10, 85, 20]))
    stored = await store.get(KEY)
    assert stored is not None
    assert stored.progress == 90


async def test_list_for_user_is_newest_first_with_limit(store: TaskStateStore) -> None:
    """A user's records come newest first, at most `limit` of them."""
    for order in [3, 1, 4, 2, 0]:
        await store.create(make_record(f"t{order}", order=order))
    newest = await store.list_for_user("u1", 3)
    assert [r.task_id for r in newest] == ["t4", "t3", "t2"]
    assert len(await store.list_for_user("u1", 50)) == 5
    assert await store.list_for_user("u1", 0) == []


async def test_list_for_user_sees_only_that_user(store: TaskStateStore) -> None:
    """Another user's tasks never appear in a user's list; updates show in the list."""
    await store.create(make_record("a1", "alice", order=1))
    await store.create(make_record("b1", "bob", order=2))
    await store.create(make_record("a2", "alice", order=3))
    await store.update(task_key("alice", "a1"), status=TaskStatus.PROCESSING)
    alice = await store.list_for_user("alice", 10)
    assert [(r.task_id, r.status) for r in alice] == [
        ("a2", TaskStatus.PENDING), ("a1", TaskStatus.PROCESSING),
    ]  # fmt: skip
    assert [r.task_id for r in await store.list_for_user("bob", 10)] == ["b1"]
    assert await store.list_for_user("carol", 10) == []


async def test_counts_by_status_and_style(store: TaskStateStore) -> None:
    """Counts follow status transitions and group by style; empty styles are left out."""
    await store.create(make_record("t1", style_type="clay"))
    await store.create(make_record("t2", style_type="clay"))
    await store.create(make_record("t3", style_type="anime"))
    await store.create(make_record("t4", style_type=""))
    await store.update(KEY, status=TaskStatus.PROCESSING)
    await store.update(task_key("u1", "t2"), status=TaskStatus.PROCESSING)
    await store.update(task_key("u1", "t2"), **COMPLETED)
    counts = await store.counts()
    assert counts["by_status"] == {
        "pending": 2, "processing": 1, "completed": 1, "failed": 0, "cancelled": 0,
    }  # fmt: skip
    assert counts["by_style"] == {"clay": 2, "anime": 1}


async def test_a_style_change_moves_the_style_count(store: TaskStateStore) -> None:
    """Counts by style follow an update of style_type; a style left with none disappears."""
    await store.create(make_record("t1", style_type="clay"))
    await store.update(KEY, style_type="anime")
    assert (await store.counts())["by_style"] == {"anime": 1}


async def test_counts_of_an_empty_store(store: TaskStateStore) -> None:
    """An empty store counts zero for every status and no styles."""
    counts = await store.counts()
    assert set(counts["by_status"]) == {s.value for s in TaskStatus}
    assert not any(counts["by_status"].values())
    assert counts["by_style"] == {}


async def test_lease_is_exclusive(store: TaskStateStore) -> None:
    """Only one owner holds a task's lease; its holder may take it again."""
    assert await store.acquire_lease(KEY, "worker-a", 30)
    assert not await store.acquire_lease(KEY, "worker-b", 30)
    assert await store.acquire_lease(KEY, "worker-a", 30)
    assert await store.lease_owner(KEY) == "worker-a"
    assert await store.acquire_lease(task_key("u1", "t2"), "worker-b", 30)


async def test_leases_of_one_task_id_are_per_user(store: TaskStateStore) -> None:
    """The same task id under two users has two leases, each taken and dropped alone."""
    alice, bob = task_key("alice", "t1"), task_key("bob", "t1")
    assert await store.acquire_lease(alice, "worker-a", 30)
    assert await store.acquire_lease(bob, "worker-b", 30)
    assert not await store.renew_lease(bob, "worker-a", 30)
    await store.release_lease(alice, "worker-a")
    assert await store.lease_owner(alice) is None
    assert await store.lease_owner(bob) == "worker-b"


async def test_lease_renew_and_release_only_by_owner(store: TaskStateStore) -> None:
    """Another owner can neither renew nor release a lease; its owner can do both."""
    await store.acquire_lease(KEY, "worker-a", 30)
    assert not await store.renew_lease(KEY, "worker-b", 30)
    await store.release_lease(KEY, "worker-b")
    assert await store.lease_owner(KEY) == "worker-a"
    assert await store.renew_lease(KEY, "worker-a", 30)
    await store.release_lease(KEY, "worker-a")
    assert await store.lease_owner(KEY) is None
    assert not await store.renew_lease(KEY, "worker-a", 30)
    assert await store.acquire_lease(KEY, "worker-b", 30)


async def test_expired_lease_frees_the_task(store: TaskStateStore) -> None:
    """A lease left to expire lets another owner acquire it; the old owner cannot renew."""
    assert await store.acquire_lease(KEY, "worker-a", 0.05)

    async def lease_gone() -> bool:
        return await store.lease_owner(KEY) is None

    await eventually(lease_gone)
    assert not await store.renew_lease(KEY, "worker-a", 30)
    assert await store.acquire_lease(KEY, "worker-b", 30)
    assert await store.lease_owner(KEY) == "worker-b"


async def test_records_expire_after_ttl(make_store: MakeStore) -> None:
    """Records vanish ttl_s after creation, from get, lists and counts alike."""
    store = make_store(ttl_s=0.5)
    await store.create(make_record("t1", created_at=utcnow()))
    await store.update(KEY, status=TaskStatus.PROCESSING)
    assert [r.task_id for r in await store.list_for_user("u1", 10)] == ["t1"]
    assert (await store.counts())["by_status"]["processing"] == 1

    async def record_gone() -> bool:
        return await store.get(KEY) is None

    await eventually(record_gone)
    assert await store.list_for_user("u1", 10) == []
    assert (await store.counts())["by_status"]["processing"] == 0
    assert await store.create(make_record("t1", created_at=utcnow()))


async def test_ping_answers_true_while_reachable(store: TaskStateStore) -> None:
    """A working store answers its readiness ping."""
    assert await store.ping()
