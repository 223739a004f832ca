"""Interactive work may take the place of a bulk prompt still waiting in an instance's queue.

A ComfyUI server runs one prompt at a time; the pool's other slots on it hold prompts
staged behind the running one (uploaded and queued, so the GPU never waits for us). When
interactive work waits and every slot is taken, the pool asks one staged bulk prompt to give
its place back: its task withdraws the prompt (deleted from the queue before it starts),
releases the slot and waits for another, without losing an attempt. The interactive prompt
then goes to the front of that queue, behind only the prompt running there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from consumer.comfy.instance import Instance


class Preempted(Exception):
    """A staged bulk prompt gave its place to interactive work (not a failed attempt)."""


@dataclass(eq=False, slots=True)
class _Staged:
    instance: Instance
    asked: asyncio.Event = field(default_factory=asyncio.Event)


class StagedPrompts:
    """The bulk prompts waiting, unstarted, in their instance's queue."""

    def __init__(self) -> None:
        self._staged: list[_Staged] = []

    def __repr__(self) -> str:
        return f"<StagedPrompts {len(self._staged)}>"

    @contextmanager
    def holding(self, instance: Instance) -> Iterator[asyncio.Event]:
        """While a bulk prompt is staged on `instance`; the Event is set when its place is
        wanted."""
        staged = _Staged(instance)
        self._staged.append(staged)
        try:
            yield staged.asked
        finally:
            self._staged.remove(staged)

    def ask_one(
        self, suits: Callable[[Instance], bool], prefer: Callable[[Instance], bool]
    ) -> bool:
        """Ask one staged prompt on an instance that `suits` (one that `prefer`s first) to
        give its place; False when none can."""
        candidates = [s for s in self._staged if not s.asked.is_set() and suits(s.instance)]
        if not candidates:
            return False
        chosen = next((s for s in candidates if prefer(s.instance)), candidates[0])
        chosen.asked.set()
        return True
