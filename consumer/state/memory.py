"""An in-process TaskStateStore, for tests and a single replica.

Every method runs without awaiting, so each is atomic on the event loop. Queries cost
O(their result): status and style counters, a per-user and a per-task-id index change with
every write. Records, leases and batches are keyed by the caller's key (see `task_key`).

Expiry needs no sweeper task. Records, early cancels and batches all live `ttl_s` from when
they were written, so write order is expiry order: each table is an OrderedDict, and every
call first pops the expired entries off their fronts (amortised O(expired)). Leases have
their own TTLs; a heap of expiry times finds theirs.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from consumer.state import MAX_CANCELS_PER_USER, TaskCounts, TaskRecord, apply_changes, utcnow
from contracts.enums import TaskStatus

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

_K = TypeVar("_K")
_V = TypeVar("_V")

MAX_CANCELS = 100_000  # early cancels of all users together; the oldest are dropped

IndexKey = tuple[float, int, str]  # created_at timestamp, creation sequence, record key


@dataclass(slots=True)
class _Entry:
    record: TaskRecord
    expires_at: float
    index_key: IndexKey


@dataclass(slots=True)
class _Batch:
    expires_at: float
    ended: set[str] = field(default_factory=set)
    claimed_until: float = -math.inf


def _first_expired(
    table: OrderedDict[_K, _V], until: Callable[[_V], float], now: float
) -> _K | None:
    """The key at the front of `table` when its entry has expired, else None."""
    if not table:
        return None
    key = next(iter(table))
    return key if until(table[key]) <= now else None


def _bump(counter: Counter[str], key: str, delta: int) -> None:
    """Add `delta` to `counter[key]`, leaving no zero entries behind."""
    counter[key] += delta
    if not counter[key]:
        del counter[key]


class _Index:
    """Record keys grouped by a name (a user, a task id), each group sorted oldest first."""

    def __init__(self) -> None:
        self._groups: dict[str, list[IndexKey]] = {}

    def group(self, name: str) -> list[IndexKey]:
        return self._groups.get(name, [])

    def add(self, name: str, index_key: IndexKey) -> None:
        bisect.insort(self._groups.setdefault(name, []), index_key)

    def remove(self, name: str, index_key: IndexKey) -> None:
        group = self._groups[name]
        del group[bisect.bisect_left(group, index_key)]
        if not group:
            del self._groups[name]


class _Records:
    """Records in creation (= expiry) order, with the counters and indexes queries read."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.by_status: Counter[str] = Counter()
        self.by_style: Counter[str] = Counter()
        self._by_user = _Index()
        self._by_task_id = _Index()
        self._sequence = itertools.count()

    def get(self, key: str) -> TaskRecord | None:
        entry = self.entries.get(key)
        return None if entry is None else entry.record

    def add(self, record: TaskRecord, expires_at: float) -> None:
        index_key = (record.created_at.timestamp(), next(self._sequence), record.key)
        self.entries[record.key] = _Entry(record, expires_at, index_key)
        self._by_user.add(record.user_id, index_key)
        self._by_task_id.add(record.task_id, index_key)
        self._count(record, 1)

    def replace(self, new: TaskRecord) -> None:
        """Put `new` in place of its record (task id, user and created_at are unchanged)."""
        entry = self.entries[new.key]
        self._count(entry.record, -1)
        self._count(new, 1)
        entry.record = new

    def newest(self, user_id: str, limit: int) -> list[TaskRecord]:
        """The user's newest `limit` records, newest first (ties: the later created first)."""
        if limit <= 0:
            return []
        return self._records(reversed(self._by_user.group(user_id)[-limit:]))

    def oldest(self, task_id: str, limit: int) -> list[TaskRecord]:
        """The oldest `limit` records of any user with this task id, oldest first."""
        if limit <= 0:
            return []
        return self._records(self._by_task_id.group(task_id)[:limit])

    def expire(self, now: float) -> int:
        dropped = 0
        while (key := _first_expired(self.entries, _until, now)) is not None:
            self._drop(key)
            dropped += 1
        return dropped

    def _records(self, index_keys: Iterable[IndexKey]) -> list[TaskRecord]:
        return [self.entries[key].record for *_, key in index_keys]

    def _drop(self, key: str) -> None:
        entry = self.entries.pop(key)
        self._count(entry.record, -1)
        self._by_user.remove(entry.record.user_id, entry.index_key)
        self._by_task_id.remove(entry.record.task_id, entry.index_key)

    def _count(self, record: TaskRecord, delta: int) -> None:
        _bump(self.by_status, record.status.value, delta)
        if record.style_type:
            _bump(self.by_style, record.style_type, delta)


def _until(entry: _Entry | _Batch) -> float:
    return entry.expires_at


class _Leases:
    """Lease owners by record key; a heap of (expires at, key) finds the expired ones."""

    def __init__(self) -> None:
        self.holders: dict[str, tuple[str, float]] = {}  # owner, expires at
        self._heap: list[tuple[float, str]] = []  # stale entries pop harmlessly

    def holder(self, key: str) -> str | None:
        entry = self.holders.get(key)
        return None if entry is None else entry[0]

    def hold(self, key: str, owner: str, until: float) -> None:
        self.holders[key] = (owner, until)
        heapq.heappush(self._heap, (until, key))

    def release(self, key: str, owner: str) -> None:
        if self.holder(key) == owner:
            del self.holders[key]

    def expire(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            entry = self.holders.get(key)
            if entry is not None and entry[1] <= now:  # not renewed since that push
                del self.holders[key]


class _Cancels:
    """Early cancels by (user, task), in write order, bounded per user and in all."""

    def __init__(self, max_total: int) -> None:
        self._max_total = max_total
        self._expiry: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._by_user: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._expiry)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._expiry

    def add(self, user_id: str, task_id: str, until: float) -> None:
        if (user_id, task_id) in self._expiry:  # again: it starts a new life at the back
            self._drop((user_id, task_id))
        self._expiry[user_id, task_id] = until
        mine = self._by_user.setdefault(user_id, OrderedDict())
        mine[task_id] = None
        if len(mine) > MAX_CANCELS_PER_USER:
            self._drop((user_id, next(iter(mine))))
        if len(self._expiry) > self._max_total:
            self._drop(next(iter(self._expiry)))

    def expire(self, now: float) -> None:
        while (key := _first_expired(self._expiry, float, now)) is not None:
            self._drop(key)

    def _drop(self, key: tuple[str, str]) -> None:
        del self._expiry[key]
        mine = self._by_user[key[0]]
        del mine[key[1]]
        if not mine:
            del self._by_user[key[0]]


class MemoryTaskStore:
    """Records, leases, early cancels and batches in dicts; `clock` (monotonic s) decides expiry."""

    def __init__(
        self,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        max_cancels: int = MAX_CANCELS,
    ) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._records = _Records()
        self._leases = _Leases()
        self._cancels = _Cancels(max_cancels)
        self._batches: OrderedDict[str, _Batch] = OrderedDict()  # by first ended task

    def __repr__(self) -> str:
        return (
            f"<MemoryTaskStore records={len(self._records.entries)}"
            f" leases={len(self._leases.holders)} cancels={len(self._cancels)}"
            f" batches={len(self._batches)}>"
        )

    # --- records -------------------------------------------------------------------------

    async def create(self, record: TaskRecord) -> bool:
        now = self._now()
        if self._records.get(record.key) is not None:
            return False
        self._records.add(record, now + self._ttl_s)
        return True

    async def get(self, key: str) -> TaskRecord | None:
        self._now()
        return self._records.get(key)

    async def update(self, key: str, **changes: Any) -> TaskRecord | None:
        self._now()
        current = self._records.get(key)
        if current is None:
            return None
        new = apply_changes(current, changes, utcnow())
        if new is not None and new is not current:
            self._records.replace(new)
        return new

    async def find(self, task_id: str, limit: int = 10) -> list[TaskRecord]:
        self._now()
        return self._records.oldest(task_id, limit)

    async def list_for_user(self, user_id: str, limit: int) -> list[TaskRecord]:
        self._now()
        return self._records.newest(user_id, limit)

    async def counts(self) -> TaskCounts:
        self._now()
        by_status = self._records.by_status
        return TaskCounts(
            by_status={status.value: by_status[status.value] for status in TaskStatus},
            by_style=dict(self._records.by_style),
        )

    # --- leases --------------------------------------------------------------------------

    async def acquire_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        now = self._now()
        if self._leases.holder(key) not in {None, owner}:
            return False
        self._leases.hold(key, owner, now + ttl_s)
        return True

    async def renew_lease(self, key: str, owner: str, ttl_s: float) -> bool:
        now = self._now()
        if self._leases.holder(key) != owner:
            return False
        self._leases.hold(key, owner, now + ttl_s)
        return True

    async def release_lease(self, key: str, owner: str) -> None:
        self._now()
        self._leases.release(key, owner)

    async def lease_owner(self, key: str) -> str | None:
        self._now()
        return self._leases.holder(key)

    # --- early cancels and batches -------------------------------------------------------

    async def add_cancel(self, user_id: str, task_id: str) -> None:
        now = self._now()
        self._cancels.add(user_id, task_id, now + self._ttl_s)

    async def cancel_requested(self, user_id: str, task_id: str) -> bool:
        self._now()
        return (user_id, task_id) in self._cancels

    async def end_batch_task(
        self, batch_id: str, task_id: str, size: int, claim_ttl_s: float
    ) -> bool:
        now = self._now()
        batch = self._batches.setdefault(batch_id, _Batch(now + self._ttl_s))
        batch.ended.add(task_id)
        if len(batch.ended) < size or batch.claimed_until > now:
            return False
        batch.claimed_until = now + claim_ttl_s
        return True

    async def confirm_batch_announced(self, batch_id: str) -> None:
        now = self._now()
        batch = self._batches.setdefault(batch_id, _Batch(now))
        batch.expires_at = batch.claimed_until = now + self._ttl_s
        self._batches.move_to_end(batch_id)  # the latest expiry: write order holds

    # --- lifetime ------------------------------------------------------------------------

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release: the dicts go with the object."""

    def prune(self) -> int:
        """Drop everything expired now (every call does this first); returns how many records."""
        return self._expire(self._clock())

    def _now(self) -> float:
        """The clock, read once per call, after the entries expired by then are gone."""
        now = self._clock()
        self._expire(now)
        return now

    def _expire(self, now: float) -> int:
        """Pop what expired by `now` (amortised O(expired)); returns how many records."""
        self._leases.expire(now)
        self._cancels.expire(now)
        while (batch_id := _first_expired(self._batches, _until, now)) is not None:
            del self._batches[batch_id]
        return self._records.expire(now)
