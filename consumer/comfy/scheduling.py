"""What the pool knows to schedule well: a task's demand, each instance's models, load costs.

A ComfyUI server keeps one output per node in its cache, so it holds the models of the last
prompt it ran: the same checkpoint again is free, another one is a load. A reload of a
model the server read before is cheaper than a cold first load (the file is still in the
OS page cache). `LoadEstimates` learns both figures per model from the loader nodes'
execution times the socket reports, starting from a prior.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

EWMA_WEIGHT = 0.3  # of a new observation: adapts within a few loads, ignores one outlier


class Priority(enum.IntEnum):
    """Scheduling class: interactive work is served before bulk work."""

    INTERACTIVE = 0
    BULK = 1

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Demand:
    """What a task asks of the pool."""

    required_nodes: frozenset[str] = frozenset()
    models: frozenset[str] = frozenset()
    priority: Priority = Priority.INTERACTIVE
    owner: str = ""  # the user: bulk slots are shared fairly between owners


@dataclass(frozen=True, slots=True)
class ModelLoad:
    """A load the socket reported: which model, how long, and whether it was read before."""

    model: str
    seconds: float
    recent: bool


class ModelMemory:
    """The models one instance holds once its queue has drained.

    `loaded` is set when a prompt is handed to the instance (ComfyUI runs its queue in
    order, so the last prompt queued decides what stays loaded); `loading` while the prompt
    that brings them has not finished (its slot frees no sooner than a load); `seen` are
    the models it has loaded before, whose reload is cheaper.
    """

    def __init__(self) -> None:
        self.loaded: frozenset[str] = frozenset()
        self.loading = False
        self.seen: set[str] = set()

    def __repr__(self) -> str:
        return f"<ModelMemory loaded={sorted(self.loaded)}>"

    def holds(self, models: frozenset[str]) -> bool:
        return models <= self.loaded

    def queued(self, models: frozenset[str]) -> None:
        if models and not models <= self.loaded:
            self.loaded, self.loading = models, True

    def forget(self) -> None:
        """The instance went away: its process (and its loaded models) may be new."""
        self.loaded, self.loading = frozenset(), False

    def observe(
        self, loaders: Mapping[str, str], cached: Iterable[str], seconds: Mapping[str, float]
    ) -> list[ModelLoad]:
        """The loads one finished prompt paid: its loader nodes that ran, not served from
        ComfyUI's cache, with the time each took."""
        skipped = frozenset(cached)
        if frozenset(loaders.values()) == self.loaded:
            self.loading = False  # a prompt with the current models has run: they are in
        loads = []
        for node, model in loaders.items():
            if node in skipped or node not in seconds:
                continue
            loads.append(ModelLoad(model, seconds[node], recent=model in self.seen))
            self.seen.add(model)
        return loads


class LoadEstimates:
    """Seconds to load each model, cold and recently read, learned (EWMA) from `ModelLoad`s."""

    def __init__(self, prior_s: float) -> None:
        self.prior_s = prior_s
        self._cold: dict[str, float] = {}
        self._recent: dict[str, float] = {}

    def __repr__(self) -> str:
        return f"<LoadEstimates cold={self._cold} recent={self._recent}>"

    def seconds(self, model: str, recent: bool) -> float:
        cold = self._cold.get(model, self.prior_s)
        if not recent:
            return cold
        return self._recent.get(model, cold)

    def cost_s(self, memory: ModelMemory, models: frozenset[str]) -> float:
        """What running `models` next costs on an instance in loads (0 when it holds them)."""
        missing = models - memory.loaded
        return sum(self.seconds(m, recent=m in memory.seen) for m in missing)

    def learn(self, load: ModelLoad) -> None:
        table = self._recent if load.recent else self._cold
        old = table.get(load.model)
        table[load.model] = (
            load.seconds if old is None else old + EWMA_WEIGHT * (load.seconds - old)
        )
