"""Records and waits the state tests build on."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from consumer.state import TaskRecord, task_key

BASE_TIME = datetime.now(UTC)  # refreshed for every test by conftest
POLL_INTERVAL_S = 0.01
KEY = task_key("u1", "t1")  # where make_record() is stored


def make_record(task_id: str = "t1", user_id: str = "u1", **fields: Any) -> TaskRecord:
    """A pending record; `order` n makes created_at n milliseconds after a fixed base."""
    order = fields.pop("order", 0)
    created_at = BASE_TIME + timedelta(milliseconds=order)
    defaults: dict[str, Any] = {
        "style_type": "clay",
        "created_at": created_at,
        "updated_at": created_at,
    }
    return TaskRecord(task_id=task_id, user_id=user_id, **(defaults | fields))


async def eventually(check: Callable[[], Awaitable[bool]], timeout_s: float = 5.0) -> None:
    """Poll `check` until it holds; fail with TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        # polling is the point: expiry happens inside Redis, with no event to await
        while not await check():  # noqa: ASYNC110
            await asyncio.sleep(POLL_INTERVAL_S)
