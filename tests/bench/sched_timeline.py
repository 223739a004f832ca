"""What each emulated ComfyUI instance did, read back from its own /history.

Real ComfyUI's /history has all this too: each prompt's graph, `execution_start`, the nodes
`execution_cached` served from the cache, and how it ended, with timestamps. A checkpoint
loader that is not in `execution_cached` ran: the instance paid a load. The emulator charges
a cold load for the first read of a file since it started, a recent (page-cache) reload for
every later one (consumer/testing/emulator_models.py), and each benchmark run starts fresh
emulators: so the kind of every load, and what it cost, follow from the order of prompts.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import aiohttp

from consumer.testing.comfyui_emulator import Faults
from consumer.testing.emulator_models import RELOAD_FRACTION

LOADER = "CheckpointLoaderSimple"
SAVER = "SaveImage"
ENDINGS = ("execution_success", "execution_error", "execution_interrupted")


@dataclass(frozen=True)
class Prompt:
    """One prompt an instance executed; times in wall-clock seconds."""

    instance: int
    task_id: str
    start_s: float
    end_s: float
    checkpoint: str
    load: str | None  # "cold", "recent", or None (the loader was cached)
    load_s: float
    ok: bool

    @property
    def execution_s(self) -> float:
        return self.end_s - self.start_s


async def histories(urls: list[str]) -> list[Prompt]:
    """Every prompt every instance ran, oldest first per instance (loads not yet classified)."""
    prompts: list[Prompt] = []
    async with aiohttp.ClientSession() as http:
        for index, url in enumerate(urls):
            async with http.get(f"{url}/history") as response:
                entries = await response.json()
            prompts.extend(_prompt(index, entry) for entry in entries.values())
    return prompts


def _prompt(instance: int, entry: dict[str, Any]) -> Prompt:
    stamps = dict(entry["status"]["messages"])
    graph: dict[str, Any] = entry["prompt"][2]
    loader, checkpoint = next(
        ((nid, n["inputs"]["ckpt_name"]) for nid, n in graph.items() if n["class_type"] == LOADER),
        ("", ""),
    )
    cached = set(stamps.get("execution_cached", {}).get("nodes", []))
    ending = next((stamps[kind] for kind in ENDINGS if kind in stamps), stamps["execution_start"])
    return Prompt(
        instance=instance,
        task_id=_task_id(graph),
        start_s=stamps["execution_start"]["timestamp"] / 1000,
        end_s=ending["timestamp"] / 1000,
        checkpoint=checkpoint,
        load="?" if loader and loader not in cached else None,
        load_s=0.0,
        ok="execution_success" in stamps,
    )


def _task_id(graph: dict[str, Any]) -> str:
    """The pipeline names outputs `<subfolder>/<task_id>-<8 hex>`."""
    prefix = next(
        (n["inputs"]["filename_prefix"] for n in graph.values() if n["class_type"] == SAVER), ""
    )
    return str(prefix).rsplit("/", 1)[-1].rsplit("-", 1)[0]


def classify(prompts: Iterable[Prompt], faults: Faults) -> list[Prompt]:
    """Each load marked cold (first read of that file on that instance) or recent, with its
    cost as the emulator charged it; sorted by instance, then start."""
    reload_s = faults.model_reload_seconds
    costs = {
        "cold": faults.model_load_seconds,
        "recent": faults.model_load_seconds * RELOAD_FRACTION if reload_s is None else reload_s,
    }
    seen: set[tuple[int, str]] = set()
    out = []
    for p in sorted(prompts, key=lambda p: (p.instance, p.start_s)):
        if p.load is None:
            out.append(p)
            continue
        kind = "recent" if (p.instance, p.checkpoint) in seen else "cold"
        seen.add((p.instance, p.checkpoint))
        out.append(_with_load(p, kind, costs[kind]))
    return out


def _with_load(p: Prompt, kind: str, seconds: float) -> Prompt:
    return Prompt(p.instance, p.task_id, p.start_s, p.end_s, p.checkpoint, kind, seconds, p.ok)


@dataclass(frozen=True)
class Usage:
    """Loads and instance time over a run of `instances` instances lasting `makespan_s`."""

    loads_cold: int
    loads_recent: int
    busy_s: float  # execution_start -> end, summed
    load_s: float  # of which loading checkpoints
    task_s: float  # median execution of a prompt, less its checkpoint load
    window_s: float  # first execution_start -> last end, over all instances

    @property
    def loads(self) -> int:
        return self.loads_cold + self.loads_recent


def usage(prompts: list[Prompt]) -> Usage:
    net = [p.execution_s - p.load_s for p in prompts if p.ok]
    return Usage(
        loads_cold=sum(p.load == "cold" for p in prompts),
        loads_recent=sum(p.load == "recent" for p in prompts),
        busy_s=sum(p.execution_s for p in prompts),
        load_s=sum(p.load_s for p in prompts),
        task_s=statistics.median(net) if net else 0.0,
        window_s=max(p.end_s for p in prompts) - min(p.start_s for p in prompts),
    )


def runs(prompts: list[Prompt], instance: int, letter: dict[str, str]) -> str:
    """One instance's checkpoints in order, run-length coded: `A12 B3r A5r` (a segment that
    began with a load ends in c (cold) or r (recent))."""
    segments: list[list[Any]] = []
    for p in (p for p in prompts if p.instance == instance):
        name = letter.get(p.checkpoint, "?")
        if segments and segments[-1][0] == name and p.load is None:
            segments[-1][1] += 1
        else:
            segments.append([name, 1, (p.load or "")[:1]])
    return " ".join(f"{name}{count}{kind}" for name, count, kind in segments)
