"""Typed views of ComfyUI wire payloads: WebSocket events, /history entries, /queue, 400 bodies.

Private to `consumer.comfy`. Parsing is defensive: a payload that does not have the shape
ComfyUI 0.8.0 sends (see /work/shared/comfyui-traces) becomes `None` or an empty value,
never an exception, because a custom node's odd message must not kill the socket reader.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

JsonObject = Mapping[str, Any]
_PAIR = 2


@dataclass(frozen=True, slots=True)
class OutputImage:
    """One file a node produced; fetch it with `ComfyClient.view`."""

    filename: str
    subfolder: str = ""
    type: str = "output"


@dataclass(frozen=True, slots=True)
class Status:
    queue_remaining: int


@dataclass(frozen=True, slots=True)
class ExecutionStart:
    prompt_id: str


@dataclass(frozen=True, slots=True)
class ExecutionCached:
    prompt_id: str
    nodes: frozenset[str]


@dataclass(frozen=True, slots=True)
class Executing:
    """A node started; `prompt_id` is None in the bare frame sent on reconnect."""

    prompt_id: str | None
    node: str | None


@dataclass(frozen=True, slots=True)
class Progress:
    prompt_id: str
    node: str | None
    value: float
    max: float


@dataclass(frozen=True, slots=True)
class Executed:
    prompt_id: str
    node: str
    images: tuple[OutputImage, ...]


@dataclass(frozen=True, slots=True)
class ExecutionSuccess:
    prompt_id: str


@dataclass(frozen=True, slots=True)
class ExecutionFailed:
    """`execution_error`: a node raised. `ExecutionBlocked` ones are not parsed into this."""

    prompt_id: str
    node_id: str
    node_type: str
    exception_type: str
    exception_message: str


@dataclass(frozen=True, slots=True)
class ExecutionInterrupted:
    prompt_id: str
    node_id: str | None
    node_type: str | None


Event = (
    Status
    | ExecutionStart
    | ExecutionCached
    | Executing
    | Progress
    | Executed
    | ExecutionSuccess
    | ExecutionFailed
    | ExecutionInterrupted
)


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _num(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def parse_images(output: object) -> tuple[OutputImage, ...]:
    """The `images` items of a node's UI output (`executed.output` or `history.outputs[n]`)."""
    if not isinstance(output, Mapping):
        return ()
    items = output.get("images")
    if not isinstance(items, list):
        return ()
    return tuple(
        OutputImage(
            item["filename"], str(item.get("subfolder", "")), str(item.get("type", "output"))
        )
        for item in items
        if isinstance(item, Mapping) and isinstance(item.get("filename"), str)
    )


def _status(data: JsonObject) -> Event | None:
    status = data.get("status")
    info = status.get("exec_info") if isinstance(status, Mapping) else None
    remaining = info.get("queue_remaining") if isinstance(info, Mapping) else None
    return Status(remaining) if isinstance(remaining, int) else None


def _start(_data: JsonObject, prompt_id: str) -> Event | None:
    return ExecutionStart(prompt_id)


def _cached(data: JsonObject, prompt_id: str) -> Event | None:
    nodes = data.get("nodes")
    return ExecutionCached(prompt_id, frozenset(str(n) for n in nodes or ()))


def _progress(data: JsonObject, prompt_id: str) -> Event | None:
    return Progress(
        prompt_id, _str(data.get("node")), _num(data.get("value")), _num(data.get("max"))
    )


def _executed(data: JsonObject, prompt_id: str) -> Event | None:
    node = _str(data.get("node"))
    return Executed(prompt_id, node, parse_images(data.get("output"))) if node else None


def _success(_data: JsonObject, prompt_id: str) -> Event | None:
    return ExecutionSuccess(prompt_id)


def _error(data: JsonObject, prompt_id: str) -> Event | None:
    if data.get("exception_type") == "ExecutionBlocked":
        return None  # non-terminal: the prompt goes on and may still succeed
    return ExecutionFailed(
        prompt_id,
        str(data.get("node_id")),
        str(data.get("node_type")),
        str(data.get("exception_type", "")),
        str(data.get("exception_message", "")).strip(),
    )


def _interrupted(data: JsonObject, prompt_id: str) -> Event | None:
    return ExecutionInterrupted(prompt_id, _str(data.get("node_id")), _str(data.get("node_type")))


_PROMPT_EVENTS: dict[str, Callable[[JsonObject, str], Event | None]] = {
    "execution_start": _start,
    "execution_cached": _cached,
    "progress": _progress,
    "executed": _executed,
    "execution_success": _success,
    "execution_error": _error,
    "execution_interrupted": _interrupted,
}


def parse_event(message: object) -> Event | None:
    """One decoded text frame `{"type", "data"}` -> a typed event, or None to ignore it."""
    if not isinstance(message, Mapping):
        return None
    kind, data = message.get("type"), message.get("data")
    if not isinstance(data, Mapping):
        return None
    if kind == "status":
        return _status(data)
    if kind == "executing":
        return Executing(_str(data.get("prompt_id")), _str(data.get("node")))
    parse = _PROMPT_EVENTS.get(str(kind))
    prompt_id = _str(data.get("prompt_id"))
    return parse(data, prompt_id) if parse and prompt_id else None


@dataclass(frozen=True, slots=True)
class HistoryEntry:
    """A finished prompt as `/history/{id}` reports it."""

    succeeded: bool
    images: tuple[OutputImage, ...]
    last_event: Event | None = None
    status_str: str = ""


def _mapping(value: object) -> JsonObject:
    return value if isinstance(value, Mapping) else {}


def _last_message(status: JsonObject) -> Event | None:
    """The last `[type, data]` item of a history status: how the prompt ended."""
    messages = status.get("messages")
    last = messages[-1] if isinstance(messages, list) and messages else None
    if not isinstance(last, list) or len(last) != _PAIR:
        return None
    return parse_event({"type": last[0], "data": last[1]})


def parse_history(prompt_id: str, body: object) -> HistoryEntry | None:
    """`/history/{id}` -> the entry, or None while `{}` (queued, running, unknown or lost)."""
    entry = body.get(prompt_id) if isinstance(body, Mapping) else None
    if not isinstance(entry, Mapping):
        return None
    status = _mapping(entry.get("status"))
    outputs = _mapping(entry.get("outputs"))
    images = tuple(img for out in outputs.values() for img in parse_images(out))
    succeeded = status.get("status_str") == "success" or bool(status.get("completed"))
    return HistoryEntry(succeeded, images, _last_message(status), str(status.get("status_str", "")))


@dataclass(frozen=True, slots=True)
class QueueState:
    """Prompt ids in `/queue`: the running one(s) and the pending ones."""

    running: frozenset[str] = field(default_factory=frozenset)
    pending: frozenset[str] = field(default_factory=frozenset)

    def __contains__(self, prompt_id: object) -> bool:
        return prompt_id in self.running or prompt_id in self.pending


def _queue_ids(items: object) -> frozenset[str]:
    if not isinstance(items, list):
        return frozenset()
    return frozenset(str(i[1]) for i in items if isinstance(i, list) and len(i) > 1)


def parse_queue(body: object) -> QueueState:
    """`/queue` -> ids only (items are `[number, prompt_id, prompt, extra_data, outputs]`)."""
    if not isinstance(body, Mapping):
        return QueueState()
    return QueueState(_queue_ids(body.get("queue_running")), _queue_ids(body.get("queue_pending")))


def _node_label(node_id: str, prompt: JsonObject, class_type: object) -> str:
    node = prompt.get(node_id)
    meta = node.get("_meta") if isinstance(node, Mapping) else None
    title = meta.get("title") if isinstance(meta, Mapping) else None
    label = f"node {node_id} ({class_type}"
    return f"{label} {title!r})" if title else f"{label})"


def _input_error(error: object) -> str:
    if not isinstance(error, Mapping):
        return str(error)
    extra = error.get("extra_info")
    name = extra.get("input_name") if isinstance(extra, Mapping) else None
    details = error.get("details") or error.get("message") or ""
    prefix = f"input {name!r}: " if name else ""
    return f"{prefix}{error.get('type')}: {details}"


def describe_rejection(body: object, prompt: JsonObject) -> str:
    """A 400 from POST /prompt -> one line naming each failing node, its class/title and input."""
    if not isinstance(body, Mapping):
        return f"unexpected body {str(body)[:200]!r}"
    error = body.get("error")
    head = error if isinstance(error, Mapping) else {}
    parts = [f"{head.get('type', 'error')}: {head.get('message', '')}".rstrip(": ")]
    if head.get("details"):
        parts[0] += f" ({head['details']})"
    node_errors = body.get("node_errors")
    for node_id, info in (node_errors if isinstance(node_errors, Mapping) else {}).items():
        if not isinstance(info, Mapping):
            continue
        label = _node_label(str(node_id), prompt, info.get("class_type"))
        reasons = "; ".join(_input_error(e) for e in info.get("errors") or ())
        parts.append(f"{label}: {reasons}")
    return "; ".join(parts)
