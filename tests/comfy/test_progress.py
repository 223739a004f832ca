"""The 0-100 progress figure, replayed from real traces and from hand-made sequences."""

from __future__ import annotations

from collections import defaultdict

from consumer.comfy.messages import (
    Executed,
    Executing,
    ExecutionCached,
    ExecutionSuccess,
    Progress,
    parse_event,
)
from consumer.comfy.progress import ProgressTracker
from tests.comfy.test_messages import trace


def replay(name: str) -> dict[str, list[int]]:
    """Figures per prompt id, feeding each prompt's events to its own tracker."""
    graphs = {
        item["response"]["prompt_id"]: frozenset(item["request"]["prompt"])
        for item in trace(name)
        if item["kind"] == "http" and item["path"] == "/prompt" and item["status"] == 200
    }
    trackers = {pid: ProgressTracker(graph) for pid, graph in graphs.items()}
    figures: dict[str, list[int]] = defaultdict(list)
    for item in trace(name):
        event = parse_event(item["message"]) if item["kind"] == "ws_text" else None
        prompt_id = str(getattr(event, "prompt_id", None))
        tracker = trackers.get(prompt_id)
        if tracker is None:
            continue
        match event:
            case ExecutionCached(nodes=nodes):
                tracker.cached(nodes)
            case Executing(node=node):
                tracker.executing(node)
            case Progress(node=node, value=value, max=maximum):
                tracker.progress(node, value, maximum)
            case Executed(node=node):
                tracker.executed(node)
            case ExecutionSuccess():
                tracker.succeeded()
        figures[prompt_id].append(tracker.percent)
    return figures


def test_img2img_progress_is_monotonic_and_ends_at_100() -> None:
    """Three real SD1.5 runs: figures never go down, reach 99 before success, then 100."""
    for figures in replay("img2img_random_sd15.json").values():
        assert figures == sorted(figures)
        assert figures[-1] == 100
        assert 99 in figures


def test_cached_nodes_shrink_the_total() -> None:
    """With nodes 1-5 cached, the sampler (first of 3 nodes to run) moves the figure by thirds."""
    tracker = ProgressTracker(frozenset("12345678"))
    tracker.cached(frozenset("12345"))
    tracker.executing("6")
    tracker.progress("6", 2, 4)
    assert tracker.percent == 16
    tracker.executing("7")
    assert tracker.percent == 33


def test_fully_cached_prompt_only_reports_executed() -> None:
    """All nodes cached: the replayed `executed` changes nothing until success gives 100."""
    figures = replay("happy_path_invert.json")
    cached_run = figures["61715b62-89e8-4644-b89e-b7e0c7abf629"]
    assert cached_run == [0, 0, 0, 100, 100]


def test_figure_never_decreases_when_a_new_node_restarts_its_bar() -> None:
    """A second progress bar starting at 0 does not pull the figure back."""
    tracker = ProgressTracker(frozenset({"a", "b"}))
    tracker.progress("a", 9, 10)
    before = tracker.percent
    tracker.executing("b")
    tracker.progress("b", 0, 10)
    assert tracker.percent >= before


def test_never_100_before_success() -> None:
    """Every node done but no success yet: the figure stops at 99."""
    tracker = ProgressTracker(frozenset({"a"}))
    tracker.executed("a")
    tracker.executing(None)
    assert tracker.percent == 99
    tracker.succeeded()
    assert tracker.percent == 100


def test_unknown_node_ids_do_not_overflow() -> None:
    """Expanded/ephemeral node ids outside the graph never push the figure past 99."""
    tracker = ProgressTracker(frozenset({"a"}))
    for node in ("a", "a.1", "a.2", None):
        tracker.executing(node)
    assert tracker.percent == 99
