"""`Instance`: one ComfyUI server of the pool, its slot counter, health and timings."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import asdict, dataclass
from typing import Any

from consumer.comfy.client import ComfyClient
from consumer.comfy.scheduling import ModelMemory

log = logging.getLogger(__name__)

_RECENT_RUNS = 20


@dataclass(frozen=True, slots=True)
class InstanceStats:
    """A snapshot for metrics, /readyz and logs."""

    name: str
    url: str
    healthy: bool
    in_flight: int
    capacity: int
    mean_execute_s: float | None
    consecutive_failures: int
    websocket_connected: bool
    models: tuple[str, ...] = ()
    draining: bool = False  # removed from the membership: no new prompts, leaves once idle

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Instance:
    """A slot counter (`in_flight` of `capacity`) plus what the health probe learnt.

    `node_classes` is None until /object_info was read once; it is re-read each time the
    instance comes back, since a restart may change its custom nodes. A `draining` instance
    was removed from the membership: it takes no new prompt and leaves the pool once idle
    (consumer/comfy/members.py).
    """

    def __init__(self, name: str, client: ComfyClient, capacity: int) -> None:
        self.name = name
        self.client = client
        self.capacity = capacity
        self.in_flight = 0
        self.healthy = False
        self.node_classes: frozenset[str] | None = None
        self.consecutive_failures = 0
        self.consecutive_stuck = 0
        self.quarantined_until = 0.0  # the breaker is open until then, whatever probes say
        self.last_released_at = time.monotonic()
        self.wake = asyncio.Event()  # set to make the health loop probe now
        self.memory = ModelMemory()
        self.draining = False
        self.drain_deadline = math.inf  # loop time its running prompts are given up at
        self._recent_s: deque[float] = deque(maxlen=_RECENT_RUNS)
        self._logged_missing: set[frozenset[str]] = set()

    def __repr__(self) -> str:
        state = "healthy" if self.healthy else "out"
        state += " draining" if self.draining else ""
        return f"<Instance {self.name} {state} busy={self.in_flight}/{self.capacity}>"

    @property
    def url(self) -> str:
        return self.client.base_url

    @property
    def given_up(self) -> bool:
        """Its prompts were given up (its client abandoned): it cannot be restored, only leave."""
        return self.client.abandoned is not None

    @property
    def serving(self) -> bool:
        """Takes new prompts: healthy and not draining."""
        return self.healthy and not self.draining

    @property
    def free(self) -> int:
        return self.capacity - self.in_flight

    @property
    def mean_execute_s(self) -> float | None:
        return sum(self._recent_s) / len(self._recent_s) if self._recent_s else None

    def record_execution(self, seconds: float) -> None:
        self._recent_s.append(seconds)

    def missing(self, required: frozenset[str]) -> frozenset[str]:
        """Required node classes this instance lacks (all of them while unknown)."""
        return required - self.node_classes if self.node_classes is not None else required

    def can_run(self, required: frozenset[str]) -> bool:
        """Known to offer every required node class; logs what is missing, once."""
        missing = self.missing(required)
        if missing and self.node_classes is not None and required not in self._logged_missing:
            self._logged_missing.add(required)
            log.warning("instance %s lacks node classes %s", self.name, ", ".join(sorted(missing)))
        return not missing

    def quarantine(self, base_s: float, max_s: float) -> float:
        """Open the breaker after a stuck prompt; longer each time in a row. Returns seconds."""
        self.consecutive_stuck += 1
        delay_s = breaker_delay_s(self.consecutive_stuck, base_s, max_s)
        self.quarantined_until = time.monotonic() + delay_s
        return delay_s

    @property
    def quarantined(self) -> bool:
        return time.monotonic() < self.quarantined_until

    def forget_node_classes_log(self) -> None:
        self._logged_missing.clear()

    def stats(self) -> InstanceStats:
        return InstanceStats(
            name=self.name,
            url=self.url,
            healthy=self.healthy,
            in_flight=self.in_flight,
            capacity=self.capacity,
            mean_execute_s=self.mean_execute_s,
            consecutive_failures=self.consecutive_failures,
            websocket_connected=self.client.connected,
            models=tuple(sorted(self.memory.loaded)),
            draining=self.draining,
        )


def breaker_delay_s(failures: int, interval_s: float, max_backoff_s: float) -> float:
    """Seconds until the next probe of an instance that failed `failures` times in a row."""
    if failures <= 0:
        return interval_s
    return min(interval_s * 2.0 ** (failures - 1), max_backoff_s)
