"""One 0-100 figure per prompt, from the WebSocket events of that prompt.

    percent = (nodes done + current node's value/max) / nodes that will run

"Nodes that will run" is the graph minus the nodes `execution_cached` lists: cached nodes
emit no `executing` (cached output nodes still emit `executed`, which is ignored here). A
node counts as done when the next one starts, when it reports `executed`, or when the
prompt ends. The figure never goes down and stays below 100 until the prompt succeeded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

_FULL = 100
_BEFORE_DONE = 99


@dataclass
class ProgressTracker:
    """Progress of one prompt. Feed it events in arrival order; read `percent`."""

    graph: frozenset[str]
    _cached: frozenset[str] = frozenset()
    _done: set[str] = field(default_factory=set)
    _current: str | None = None
    _fraction: float = 0.0
    _percent: int = 0

    @property
    def percent(self) -> int:
        return self._percent

    def cached(self, nodes: frozenset[str]) -> None:
        self._cached = nodes & self.graph
        self._update()

    def executing(self, node: str | None) -> None:
        """A node started (or, with None, the prompt ended)."""
        if node == self._current:
            return
        self._finish_current()
        self._current, self._fraction = node, 0.0
        self._update()

    def progress(self, node: str | None, value: float, maximum: float) -> None:
        if node is not None and node != self._current:
            self.executing(node)
        if maximum > 0:
            self._fraction = min(max(value / maximum, 0.0), 1.0)
        self._update()

    def executed(self, node: str) -> None:
        if node in self.graph and node not in self._cached:
            self._done.add(node)
            if node == self._current:
                self._current, self._fraction = None, 0.0
        self._update()

    def succeeded(self) -> None:
        self._percent = _FULL

    def _finish_current(self) -> None:
        if self._current in self.graph and self._current not in self._cached:
            self._done.add(self._current)

    def _update(self) -> None:
        total = max(len(self.graph - self._cached), 1)
        done = min(len(self._done), total)
        fraction = self._fraction if done < total else 0.0
        figure = int(_FULL * (done + fraction) / total)
        self._percent = max(self._percent, min(figure, _BEFORE_DONE))
