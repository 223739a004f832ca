"""An in-process TaskStateStore, for tests and a single replica.

Every method runs without awaiting, so each is atomic on the event loop. Expired records
and leases are dropped lazily when touched, and all at once by `prune()`.
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any, TypeVar

from consumer.state import TaskCounts, TaskRecord, apply_changes, utcnow
from contracts.enums import TaskStatus

if TYPE_CHECKING:
    from collections.abc import Callable

_T = TypeVar("_T")


PRUNE_EVERY = 1024  # records created between two sweeps of the expired ones


class MemoryTaskStore:
    """Records and leases in dicts; `clock` (monotonic seconds) decides expiry."""

    def __init__(self, ttl_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl_s = ttl_s
        self._clock = clock
        self._records: dict[str, tuple[TaskRecord, float]] = {}  # record, expires at
        self._leases: dict[str, tuple[str, float]] = {}  # owner, expires at

    def __repr__(self) -> str:
        return f"<MemoryTaskStore records={len(self._records)} leases={len(self._leases)}>"

    async def create(self, record: TaskRecord) -> bool:
        if self._live(record.task_id) is not None:
            return False
        self._records[record.task_id] = (record, self._clock() + self._ttl_s)
        if len(self._records) % PRUNE_EVERY == 0:  # bounded memory without a sweeper task
            self.prune()
        return True

    async def get(self, task_id: str) -> TaskRecord | None:
        return self._live(task_id)

    async def update(self, task_id: str, **changes: Any) -> TaskRecord | None:
        current = self._live(task_id)
        if current is None:
            return None
        new = apply_changes(current, changes, utcnow())
        if new is not None and new is not current:
            self._records[task_id] = (new, self._records[task_id][1])
        return new

    async def list_for_user(self, user_id: str, limit: int) -> list[TaskRecord]:
        self.prune()
        mine = [
            record for record, _ in reversed(self._records.values()) if record.user_id == user_id
        ]
        mine.sort(key=lambda record: record.created_at, reverse=True)  # stable: ties newest first
        return mine[: max(limit, 0)]

    async def counts(self) -> TaskCounts:
        self.prune()
        records = [record for record, _ in self._records.values()]
        by_status = Counter(record.status.value for record in records)
        by_style = Counter(record.style_type for record in records if record.style_type)
        return TaskCounts(
            by_status={status.value: by_status[status.value] for status in TaskStatus},
            by_style=dict(by_style),
        )

    async def acquire_lease(self, task_id: str, owner: str, ttl_s: float) -> bool:
        holder = self._lease_holder(task_id)
        if holder not in {None, owner}:
            return False
        self._leases[task_id] = (owner, self._clock() + ttl_s)
        return True

    async def renew_lease(self, task_id: str, owner: str, ttl_s: float) -> bool:
        if self._lease_holder(task_id) != owner:
            return False
        self._leases[task_id] = (owner, self._clock() + ttl_s)
        return True

    async def release_lease(self, task_id: str, owner: str) -> None:
        if self._lease_holder(task_id) == owner:
            del self._leases[task_id]

    async def lease_owner(self, task_id: str) -> str | None:
        return self._lease_holder(task_id)

    async def ping(self) -> bool:
        return True

    async def close(self) -> None:
        """Nothing to release: the dicts go with the object."""

    def prune(self) -> int:
        """Drop every expired record and lease now; returns how many records went."""
        now = self._clock()
        _drop_expired(self._leases, now)
        return _drop_expired(self._records, now)

    def _live(self, task_id: str) -> TaskRecord | None:
        return _unexpired(self._records, task_id, self._clock())

    def _lease_holder(self, task_id: str) -> str | None:
        return _unexpired(self._leases, task_id, self._clock())


def _unexpired(table: dict[str, tuple[_T, float]], key: str, now: float) -> _T | None:
    """The value under `key` unless it expired (then it is dropped)."""
    entry = table.get(key)
    if entry is None:
        return None
    if entry[1] <= now:
        del table[key]
        return None
    return entry[0]


def _drop_expired(table: dict[str, tuple[_T, float]], now: float) -> int:
    expired = [key for key, (_, until) in table.items() if until <= now]
    for key in expired:
        del table[key]
    return len(expired)
