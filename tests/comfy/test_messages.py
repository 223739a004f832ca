"""Wire parsing against recorded traces of a real ComfyUI 0.8.0 (tests/data/comfyui-traces)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from consumer.comfy.messages import (
    Executed,
    Executing,
    ExecutionCached,
    ExecutionFailed,
    ExecutionInterrupted,
    ExecutionStart,
    ExecutionSuccess,
    OutputImage,
    Progress,
    Status,
    describe_rejection,
    parse_event,
    parse_history,
    parse_queue,
)

TRACES = Path(__file__).parents[1] / "data" / "comfyui-traces"


def trace(name: str) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = json.loads((TRACES / name).read_text())
    return items


def http(name: str, method: str, path_prefix: str) -> list[dict[str, Any]]:
    return [
        item
        for item in trace(name)
        if item["kind"] == "http"
        and item["method"] == method
        and item["path"].startswith(path_prefix)
    ]


def ws_events(name: str) -> list[Any]:
    return [parse_event(item["message"]) for item in trace(name) if item["kind"] == "ws_text"]


def test_every_text_frame_of_the_happy_path_parses() -> None:
    """Each frame type of a real run maps to its typed event; progress_state is ignored."""
    events = ws_events("happy_path_invert.json")
    kinds = {type(e) for e in events if e is not None}
    assert kinds == {Status, ExecutionStart, ExecutionCached, Executing, Executed, ExecutionSuccess}
    executed = next(e for e in events if isinstance(e, Executed))
    assert executed.images == (OutputImage("inv-81fd34d9_00001_.png", "trace", "output"),)


def test_sampler_steps_parse_as_progress() -> None:
    """KSampler `progress` frames carry prompt id, node and value/max."""
    steps = [e for e in ws_events("img2img_random_sd15.json") if isinstance(e, Progress)]
    assert steps[0] == Progress("ce2fd594-7413-451b-b432-7a912fd66ec5", "6", 1.0, 4.0)
    assert len(steps) == 12


def test_bare_executing_after_reconnect_has_no_prompt_id() -> None:
    """The reconnect handshake's `executing` carries a node but no prompt id."""
    events = ws_events("ws_reconnect_mid_prompt.json")
    assert Executing(None, "2") in events


def test_execution_error_keeps_node_and_message() -> None:
    """A runtime error names node id, class, exception type and message."""
    failed = next(e for e in ws_events("errors.json") if isinstance(e, ExecutionFailed))
    assert (failed.node_id, failed.node_type, failed.exception_type) == (
        "2",
        "ImageSharpen",
        "RuntimeError",
    )
    assert failed.exception_message.startswith("Argument #4: Padding size")


def test_execution_blocked_is_not_terminal() -> None:
    """An ExecutionBlocked error frame is ignored: the prompt may still succeed."""
    frame = {
        "type": "execution_error",
        "data": {"prompt_id": "p", "exception_type": "ExecutionBlocked"},
    }
    assert parse_event(frame) is None


def test_unknown_and_malformed_frames_are_ignored() -> None:
    """Custom-node types and odd shapes become None instead of raising."""
    assert parse_event({"type": "crystools.monitor", "data": {}}) is None
    assert parse_event({"type": "progress", "data": "x"}) is None
    assert parse_event(["not", "a", "dict"]) is None
    assert parse_event({"type": "execution_start", "data": {}}) is None


def test_history_of_a_success_lists_images() -> None:
    """A finished entry gives its output images and a success flag."""
    item = http("happy_path_invert.json", "GET", "/history/")[0]
    prompt_id = item["path"].rsplit("/", 1)[1]
    entry = parse_history(prompt_id, item["response"])
    assert entry is not None
    assert entry.succeeded
    assert entry.images == (OutputImage("inv-81fd34d9_00001_.png", "trace", "output"),)


def test_history_of_an_error_and_an_interrupt_tell_them_apart() -> None:
    """Error and interrupt share status `error`; the last message says which."""
    error = http("errors.json", "GET", "/history/")[0]
    entry = parse_history(error["path"].rsplit("/", 1)[1], error["response"])
    assert entry is not None
    assert not entry.succeeded
    assert isinstance(entry.last_event, ExecutionFailed)
    stopped = http("queue_interrupt_delete.json", "GET", "/history/")[0]
    entry = parse_history(stopped["path"].rsplit("/", 1)[1], stopped["response"])
    assert entry is not None
    assert isinstance(entry.last_event, ExecutionInterrupted)


def test_empty_history_is_none() -> None:
    """`{}` (queued, running, unknown or lost) parses to None."""
    assert parse_history("c903e3aa", {}) is None


def test_queue_lists_running_and_pending_ids() -> None:
    """`/queue` items are 5-element arrays; only the ids are kept."""
    body = http("queue_interrupt_delete.json", "GET", "/queue")[0]["response"]
    state = parse_queue(body)
    assert state.running == {"45c986e2-c6c5-4a37-b7c7-f825d28f4422"}
    assert "51f10411-d30b-4a89-b119-ca931e612af4" in state.pending
    assert "51f10411-d30b-4a89-b119-ca931e612af4" in state


def test_rejection_names_node_class_title_and_input() -> None:
    """A 400 with node_errors becomes one line naming node id, class, title and input."""
    prompts = http("errors.json", "POST", "/prompt")
    item = prompts[2]
    prompt = dict(item["request"]["prompt"])
    prompt["2"] = {**prompt["2"], "_meta": {"title": "resize"}}
    text = describe_rejection(item["response"], prompt)
    assert "prompt_outputs_failed_validation" in text
    assert "node 2 (ImageScale 'resize')" in text
    assert "input 'upscale_method': value_not_in_list" in text
    assert "input 'width': required_input_missing" in text


def test_rejection_without_node_errors_keeps_the_top_level_reason() -> None:
    """An unknown node class (invalid_prompt) keeps the server's message and details."""
    item = http("errors.json", "POST", "/prompt")[3]
    text = describe_rejection(item["response"], {})
    assert (
        text
        == "invalid_prompt: Cannot execute because node NoSuchNode does not exist. (Node ID '#1')"
    )
