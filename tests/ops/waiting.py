"""Waiting on another process's state (a replica's or Prometheus's HTTP API): nothing to await."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

POLL_S = 0.05


async def until(check: Callable[[], Awaitable[bool]], timeout_s: float) -> None:
    """Poll `check` until it holds; TimeoutError after `timeout_s`."""
    async with asyncio.timeout(timeout_s):
        while not await check():  # noqa: ASYNC110 - another process's state, over HTTP
            await asyncio.sleep(POLL_S)
