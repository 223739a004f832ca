"""Structural comparison of two traces (the rules of tests/data/comfyui-traces/README.md).

- HTTP exchanges and WebSocket frames are two separate sequences (their interleaving races).
- HTTP: method, path, status, content type, and the shape of request and response bodies.
- WebSocket: per prompt (prompt ids numbered by first appearance), the sequence of messages,
  repeated `progress_state` collapsed to one; a message without prompt_id (the bare
  `executing` after a reconnect) belongs to the prompt seen last.
- `status` broadcasts: compared by shape only, as a multiset, not by position.
- A shape keeps key sets and leaf types; ids (UUIDs, hex client ids), timestamps, file names
  and timings fall away. Values that carry protocol meaning are kept literally: message and
  error `type`s, node ids (`node`, `node_id`, ...), `status_str`, `completed`, node `state`,
  `class_type`, `node_type`, `exception_type`, `input_name`, cached/executed node lists. An
  upload `name` keeps only whether it was renamed (" (N)").
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from typing import Any

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{32}")
_RENAMED = re.compile(r" \((\d+)\)\.\w+$")
LITERAL_KEYS = frozenset({
    "type", "status_str", "completed", "state", "node", "node_id", "display_node",
    "display_node_id", "real_node_id", "parent_node_id", "node_type", "exception_type",
    "class_type", "input_name", "executed", "current_outputs", "dependent_outputs",
})  # fmt: skip
_CACHED_LIST_KEYS = frozenset({"nodes"})


def _key(key: str) -> str:
    return "<id>" if _ID.fullmatch(key) else key


def _leaf(value: Any) -> str:
    if value is None:
        return "null"
    return type(value).__name__


def shape(value: Any, key: str | None = None) -> Any:
    """The comparable skeleton of a JSON value."""
    if isinstance(value, dict):
        return {_key(k): shape(v, k) for k, v in sorted(value.items())}
    if key in LITERAL_KEYS or (key in _CACHED_LIST_KEYS and isinstance(value, list)):
        return ["=", value]
    if key == "name" and isinstance(value, str):
        renamed = _RENAMED.search(value)
        return f"<name renamed {renamed.group(1)}>" if renamed else "<name>"
    if isinstance(value, list):
        return ["list", sorted({json.dumps(shape(x), sort_keys=True) for x in value})]
    return _leaf(value)


def _path(path: str) -> str:
    return _ID.sub("<id>", path)


def http_sequence(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    response_shape = lambda r: r if isinstance(r, str) else shape(r)  # noqa: E731
    return [
        {
            "method": it["method"],
            "path": _path(it["path"]),
            "status": it["status"],
            "content_type": it["content_type"],
            "request": shape(it["request"]),
            "response": response_shape(it["response"]),
        }
        for it in items
        if it["kind"] == "http"
    ]


def _prompt_labels(items: list[dict[str, Any]]) -> dict[str, str]:
    """Prompt ids in order of first appearance (POST answers, then messages) -> P0, P1, ..."""
    labels: dict[str, str] = {}
    for it in items:
        if it["kind"] == "http" and isinstance(it["response"], dict):
            pid = it["response"].get("prompt_id")
        elif it["kind"] == "ws_text":
            pid = it["message"].get("data", {}).get("prompt_id")
        else:
            continue
        if isinstance(pid, str) and pid not in labels:
            labels[pid] = f"P{len(labels)}"
    return labels


def ws_groups(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Per prompt: its message shapes in order, runs of progress_state collapsed to the last."""
    labels = _prompt_labels(items)
    groups: dict[str, list[Any]] = {}
    current = "none"
    for it in items:
        if it["kind"] == "ws_binary":
            groups.setdefault(current, []).append(["binary", it["event_type"]])
            continue
        if it["kind"] != "ws_text" or it["message"].get("type") == "status":
            continue
        message = it["message"]
        pid = message.get("data", {}).get("prompt_id")
        current = labels.get(pid, current) if isinstance(pid, str) else current
        group = groups.setdefault(current, [])
        entry = [message["type"], shape(message.get("data"))]
        if group and group[-1][0] == "progress_state" and message["type"] == "progress_state":
            group[-1] = entry
        else:
            group.append(entry)
    return groups


def status_shapes(items: list[dict[str, Any]]) -> Counter[str]:
    return Counter(
        json.dumps(shape(it["message"]), sort_keys=True)
        for it in items
        if it["kind"] == "ws_text" and it["message"].get("type") == "status"
    )


def _diff(a: Any, b: Any, where: str) -> Iterator[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            if key not in a or key not in b:
                side = "recorded" if key in a else "emulator"
                yield f"{where}.{key}: only in {side}"
            else:
                yield from _diff(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and a and a[0] != "=":
        for index, (x, y) in enumerate(zip(a, b, strict=True)):
            yield from _diff(x, y, f"{where}.{index}")
    elif a != b:
        yield f"{where}: recorded {json.dumps(a)[:300]} != emulator {json.dumps(b)[:300]}"


def _diff_sequences(a: list[Any], b: list[Any], where: str) -> Iterator[str]:
    if len(a) != len(b):
        yield f"{where}: {len(a)} recorded items, {len(b)} from the emulator"
    for index, (x, y) in enumerate(zip(a, b, strict=False)):
        label = x.get("method", "") + " " + x.get("path", "") if isinstance(x, dict) else str(x[0])
        yield from _diff(x, y, f"{where}[{index}] {label}".rstrip())


def compare(recorded: list[dict[str, Any]], emulated: list[dict[str, Any]]) -> list[str]:
    """Every structural difference between two traces of the same scenario (empty: equal)."""
    diffs = list(_diff_sequences(http_sequence(recorded), http_sequence(emulated), "http"))
    ws_a, ws_b = ws_groups(recorded), ws_groups(emulated)
    for label in sorted(set(ws_a) | set(ws_b)):
        diffs += _diff_sequences(ws_a.get(label, []), ws_b.get(label, []), f"ws {label}")
    status_a, status_b = status_shapes(recorded), status_shapes(emulated)
    if status_a != status_b:
        diffs.append(f"status broadcasts: recorded {dict(status_a)} != emulator {dict(status_b)}")
    return diffs
