"""Task leases: which replica runs a task, kept in the task store.

A replica holds a task's lease while it runs it and renews it every third of its TTL. A
redelivered copy on another replica waits for the lease; a replica that dies stops renewing,
so its lease expires and the task can run again.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from consumer.logs import ctx

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from consumer.state import TaskRecord, TaskStateStore

log = logging.getLogger(__name__)


class Leases:
    """This replica's side of the task leases."""

    def __init__(self, store: TaskStateStore, owner: str, ttl_s: float) -> None:
        self._store = store
        self.owner = owner
        self._ttl_s = ttl_s

    async def acquire(self, key: str) -> TaskRecord | None:
        """Wait for the lease; returns the task's record instead if it ended meanwhile."""
        while not await self._store.acquire_lease(key, self.owner, self._ttl_s):
            record = await self._store.get(key)
            if record is not None and record.status.is_terminal:
                return record
            log.info("task leased by another replica; waiting", extra=ctx(task_id=key))
            await asyncio.sleep(self._ttl_s / 3)  # a lease held elsewhere has no push
        return None

    @asynccontextmanager
    async def held(self, key: str) -> AsyncIterator[None]:
        """Renew the lease while the block runs; release it afterwards, whatever happens."""
        try:
            async with asyncio.TaskGroup() as group:
                keeper = group.create_task(self._keep(key))
                try:
                    yield
                finally:
                    keeper.cancel()
        finally:
            await asyncio.shield(self._release(key))

    async def _keep(self, key: str) -> None:
        """A store hiccup must not touch the task: renewal failures are only logged."""
        while True:
            await asyncio.sleep(self._ttl_s / 3)
            try:
                renewed = await self._store.renew_lease(key, self.owner, self._ttl_s)
            except Exception as exc:
                log.warning("lease renewal failed: %s", exc, extra=ctx(task_id=key))
                continue
            if not renewed:
                log.warning("task lease lost", extra=ctx(task_id=key))

    async def _release(self, key: str) -> None:
        try:
            await self._store.release_lease(key, self.owner)
        except Exception as exc:  # it expires by itself
            log.warning("could not release the lease of %s: %s", key, exc)
