"""The prompt queue and history of the emulator (execution.PromptQueue).

Every change (put, get, task_done, delete of a found item, clear) calls `on_change`, which
broadcasts `status` like PromptServer.queue_updated.
"""

from __future__ import annotations

import asyncio
import copy
import heapq
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

MAX_HISTORY = 10000


@dataclass
class QueueItem:
    """[number, prompt_id, prompt, extra_data, outputs_to_execute] as /queue lists it."""

    number: float
    prompt_id: str
    prompt: dict[str, Any]
    extra_data: dict[str, Any]
    outputs: list[str]

    def as_list(self) -> list[Any]:
        return [self.number, self.prompt_id, self.prompt, self.extra_data, self.outputs]

    @property
    def client_id(self) -> str | None:
        client_id = self.extra_data.get("client_id")
        return None if client_id is None else str(client_id)


class PromptQueue:
    def __init__(self, on_change: Callable[[], Awaitable[None]]) -> None:
        self._on_change = on_change
        self._heap: list[tuple[float, str, int, QueueItem]] = []
        self._sequence = 0
        self._task_counter = 0
        self._wakeup = asyncio.Event()
        self.running: dict[int, QueueItem] = {}
        self.history: dict[str, dict[str, Any]] = {}

    def remaining(self) -> int:
        return len(self._heap) + len(self.running)

    def queue_info(self) -> dict[str, Any]:
        return {"exec_info": {"queue_remaining": self.remaining()}}

    def pending(self) -> list[QueueItem]:
        """The raw heap array, not sorted (as ComfyUI answers /queue)."""
        return [entry[3] for entry in self._heap]

    async def put(self, item: QueueItem) -> None:
        self._sequence += 1
        heapq.heappush(self._heap, (item.number, item.prompt_id, self._sequence, item))
        self._wakeup.set()
        await self._on_change()

    async def get(self) -> tuple[int, QueueItem]:
        while not self._heap:
            self._wakeup.clear()
            await self._wakeup.wait()
        item = heapq.heappop(self._heap)[3]
        task_id = self._task_counter
        self._task_counter += 1
        self.running[task_id] = item
        await self._on_change()
        return task_id, item

    async def task_done(self, task_id: int, result: dict[str, Any], status: dict[str, Any]) -> None:
        item = self.running.pop(task_id)
        if len(self.history) > MAX_HISTORY:
            self.history.pop(next(iter(self.history)))
        entry: dict[str, Any] = {"prompt": copy.deepcopy(item.as_list()), "outputs": {}}
        entry["status"] = status
        entry.update(result)
        self.history[item.prompt_id] = entry
        await self._on_change()

    async def delete(self, prompt_id: str) -> None:
        for index, entry in enumerate(self._heap):
            if entry[3].prompt_id == prompt_id:
                self._heap.pop(index)
                heapq.heapify(self._heap)
                await self._on_change()
                return

    async def clear(self) -> None:
        self._heap = []
        await self._on_change()

    def get_history(self, max_items: int | None = None, offset: int = -1) -> dict[str, Any]:
        """PromptQueue.get_history without an id: oldest first, `max_items` most recent."""
        if offset < 0 and max_items is not None:
            offset = len(self.history) - max_items
        out: dict[str, Any] = {}
        for index, (prompt_id, entry) in enumerate(self.history.items()):
            if index >= offset:
                out[prompt_id] = entry
                if max_items is not None and len(out) >= max_items:
                    break
        return out
