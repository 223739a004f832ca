"""The structural comparator itself: equal traces pass, real protocol differences are caught."""

from __future__ import annotations

import copy
import json
from pathlib import Path

from tests.emulator.compare import compare

TRACES = Path(__file__).resolve().parents[1] / "data" / "comfyui-traces"


def _load(name: str) -> list[dict]:
    return json.loads((TRACES / f"{name}.json").read_text())


def _ws(items: list[dict], kind: str) -> list[dict]:
    return [it for it in items if it["kind"] == "ws_text" and it["message"]["type"] == kind]


def test_every_recorded_trace_equals_itself():
    """A trace compared with itself has no differences."""
    for path in TRACES.glob("*.json"):
        items = json.loads(path.read_text())
        assert compare(items, copy.deepcopy(items)) == [], path.name


def test_node_order_and_missing_keys_are_differences():
    """Executing nodes in another order, or a payload key less, is reported."""
    items = _load("img2img_random_sd15")
    swapped = copy.deepcopy(items)
    executing = [it for it in _ws(swapped, "executing") if it["message"]["data"]["node"] == "2"]
    executing[0]["message"]["data"]["node"] = "1"
    assert compare(items, swapped)
    fewer = copy.deepcopy(items)
    del _ws(fewer, "execution_start")[0]["message"]["data"]["timestamp"]
    assert any("timestamp: only in recorded" in d for d in compare(items, fewer))


def test_ids_timings_and_status_positions_are_ignored():
    """Other prompt ids, times and moved `status` frames make no difference."""
    items = _load("happy_path_invert")
    moved = copy.deepcopy(items)
    statuses = [it for it in moved if it["kind"] == "ws_text" and it["message"]["type"] == "status"]
    moved = [it for it in moved if it not in statuses] + statuses
    for it in moved:
        it["t_ms"] = 0
    text = json.dumps(moved)
    for index, start in enumerate(_ws(items, "execution_start")):
        text = text.replace(
            start["message"]["data"]["prompt_id"], f"{index:08d}-0000-4000-8000-{index:012d}"
        )
    assert compare(items, json.loads(text)) == []


def test_status_code_content_type_and_renames_are_differences():
    """A 400 turned 200, a lost content type, or an upload not renamed is reported."""
    items = _load("introspection_uploads")
    changed = copy.deepcopy(items)
    uploads = [it for it in changed if it["kind"] == "http" and it["path"] == "/upload/image"]
    uploads[2]["response"]["name"] = uploads[0]["response"]["name"]
    uploads[4]["status"] = 200
    uploads[0]["content_type"] = "text/plain"
    assert len(compare(items, changed)) == 3
