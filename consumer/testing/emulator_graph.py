"""ComfyUI's execution order (ExecutionList + ux_friendly_pick_node) and its classic cache.

Order: the output nodes are added in turn; each walk pushes uncached inputs depth-first, so
pending nodes keep that insertion order. A node is ready when none of its uncached inputs is
pending; among ready nodes an output node goes first, then one that feeds an output, then one
two links from an output, else the first ready one (the img2img trace: 2, 1, 5, 4, 3, 6, 7, 8).

Cache: a node's key is its class, its IS_CHANGED value and its inputs, with links replaced by
the key of the linked node. When a prompt starts, entries whose key is not in that prompt are
dropped (ComfyUI's classic cache, BasicCache.clean_unused, keeps only what the current prompt can
use): after A, B, a prompt with checkpoint A again finds only LoadImage cached and reloads A.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from consumer.testing.emulator_nodes import NodeEnv, NodeRegistry


def is_link(value: object) -> bool:
    """comfy_execution.graph_utils.is_link."""
    return (
        isinstance(value, list)
        and len(value) == 2  # noqa: PLR2004 - [node_id, output_index]
        and isinstance(value[0], str)
        and isinstance(value[1], int | float)
        and not isinstance(value[1], bool)
    )


class ExecutionList:
    """Which node runs next, exactly as ComfyUI stages them."""

    def __init__(
        self,
        prompt: Mapping[str, Any],
        is_output: Callable[[str], bool],
        is_cached: Callable[[str], bool],
    ) -> None:
        self._prompt = prompt
        self._is_output = is_output
        self._is_cached = is_cached
        self._pending: dict[str, None] = {}
        self._block_count: dict[str, int] = {}
        self._blocking: dict[str, dict[str, None]] = {}

    def add_node(self, node_id: str) -> None:
        stack, links = [node_id], []
        while stack:
            current = stack.pop()
            if current in self._pending:
                continue
            self._pending[current] = None
            self._block_count[current] = 0
            self._blocking[current] = {}
            for value in self._prompt[current]["inputs"].values():
                if is_link(value):
                    if not self._is_cached(value[0]):
                        stack.append(value[0])
                    links.append((value[0], current))
        for source, target in links:
            if not self._is_cached(source) and target not in self._blocking[source]:
                self._blocking[source][target] = None
                self._block_count[target] += 1

    def is_empty(self) -> bool:
        return not self._pending

    def next_node(self) -> str | None:
        """The node to run now; None when nothing is ready (a dependency cycle)."""
        ready = [n for n in self._pending if self._block_count[n] == 0]
        return self._pick(ready) if ready else None

    def complete(self, node_id: str) -> None:
        del self._pending[node_id]
        for target in self._blocking.pop(node_id):
            self._block_count[target] -= 1

    def _feeds_output(self, node_id: str, depth: int) -> bool:
        if depth == 0:
            return self._is_output(node_id)
        return any(self._feeds_output(t, depth - 1) for t in self._blocking.get(node_id, {}))

    def _pick(self, ready: list[str]) -> str:
        for depth in range(3):
            for node_id in ready:
                if self._feeds_output(node_id, depth):
                    return node_id
        return ready[0]


def _describe(value: Any) -> Any:
    return json.dumps(value, sort_keys=True, default=repr)


class Signatures:
    """Cache keys of every node of one prompt (IS_CHANGED evaluated once per prompt)."""

    def __init__(self, prompt: Mapping[str, Any], registry: NodeRegistry, env: NodeEnv) -> None:
        self._prompt = prompt
        self._registry = registry
        self._env = env
        self._keys: dict[str, str] = {}

    def all(self) -> dict[str, str]:
        return {node_id: self.key(node_id) for node_id in self._prompt}

    def key(self, node_id: str) -> str:
        if node_id not in self._keys:
            self._keys[node_id] = self._compute(node_id)
        return self._keys[node_id]

    def _compute(self, node_id: str) -> str:
        node = self._prompt[node_id]
        node_def = self._registry.get(node["class_type"])
        changed = None
        if node_def is not None and node_def.is_changed is not None:
            changed = node_def.is_changed(self._env, node["inputs"])
        parts: list[Any] = [node["class_type"], _describe(changed)]
        for name in sorted(node["inputs"]):
            value = node["inputs"][name]
            if is_link(value) and value[0] in self._prompt:
                parts.append([name, "link", self.key(value[0]), value[1]])
            else:
                parts.append([name, _describe(value)])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class CacheEntry:
    outputs: tuple[Any, ...]
    ui: dict[str, Any] | None


class OutputCache:
    """Node outputs (and UI results) kept between prompts, keyed by signature."""

    def __init__(self) -> None:
        self._entries: dict[str, CacheEntry] = {}
        self._current: dict[str, str] = {}

    def set_prompt(self, keys: dict[str, str]) -> None:
        wanted = set(keys.values())
        self._entries = {k: v for k, v in self._entries.items() if k in wanted}
        self._current = keys

    def get(self, node_id: str) -> CacheEntry | None:
        key = self._current.get(node_id)
        return None if key is None else self._entries.get(key)

    def set(self, node_id: str, entry: CacheEntry) -> None:
        self._entries[self._current[node_id]] = entry

    def clear(self) -> None:
        self._entries.clear()
        self._current = {}
