"""The scheduling benchmark's figures: one `Section` (a table and its JSON) per scenario."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

from consumer.settings import SchedulerPolicy
from consumer.testing.emulator_models import RELOAD_FRACTION
from tests.bench.sched_run import Batch, RunResult
from tests.bench.sched_scenarios import (
    FAIR,
    FIFO,
    FIVE_REPLICAS,
    LETTER_OF,
    MIX_FAULTS,
    REFERENCE,
)
from tests.bench.sched_timeline import Prompt, Usage, runs, usage

RATIO_TARGET = 1.3  # fair makespan / one-checkpoint makespan
FEWER_LOADS_TARGET = 0.6  # fair loads at least this much fewer than fifo's
IDEAL_TARGET = 0.99  # ideal makespan / makespan, one checkpoint
SHARE_TARGET = 0.5 / 1.2  # a user's share of completions while both batches are pending
WINDOW = 2  # SCHEDULER_WINDOW's default: bulk tasks a replica may hold beyond its slots

MixKey = tuple[SchedulerPolicy, str, bool]


@dataclass
class Section:
    title: str
    header: list[str]
    rows: list[list[str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    data: list[dict[str, Any]] = field(default_factory=list)


def verdict(ok: bool) -> str:
    return "ok" if ok else "MISS"


def pct(value: float) -> str:
    return f"{value * 100:.1f}%"


def run_json(result: RunResult, **figures: Any) -> dict[str, Any]:
    """A run's figures, each prompt (instance timeline) and each task's end, relative to t0."""
    t0 = result.t0_s
    return {
        "label": result.spec.label,
        "policy": str(result.spec.policy),
        "instances": result.spec.instances,
        "replicas": list(result.spec.replicas),
        "makespan_s": round(result.makespan_s, 3),
        "loads_seen_by_scheduler": result.metric_loads,
        "outcomes": outcomes(result),
        **figures,
        "prompts": [prompt_json(p, t0) for p in result.prompts],
        "ended": {t: round(at - t0, 3) for t, (at, _) in sorted(result.ended.items())},
        **{k: v for k, v in result.extra.items() if k == "ticks"},
    }


def prompt_json(p: Prompt, t0: float) -> list[Any]:
    """[instance, task, start, end (s after t0), checkpoint letter, load kind or None]"""
    letter = LETTER_OF.get(p.checkpoint, p.checkpoint)
    return [p.instance, p.task_id, round(p.start_s - t0, 3), round(p.end_s - t0, 3), letter, p.load]


def outcomes(result: RunResult) -> dict[str, int]:
    counts: dict[str, int] = {}
    for _, kind in result.ended.values():
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# 1. Mixed checkpoints


def mixes(results: dict[MixKey, RunResult]) -> Section:
    section = Section(
        "1. mixed checkpoints: 1 replica, 4 instances x 2 slots, sampling 0.5 s/task, "
        f"checkpoint load {MIX_FAULTS.model_load_seconds:g} s cold / "
        f"{MIX_FAULTS.model_load_seconds * RELOAD_FRACTION:.2f} s recent",
        ["mix", "policy", "published as", "makespan", "x own 1-ckpt", "x best 1-ckpt", "loads c+r",
         "sched saw", "vs fifo", "GPU busy", "useful", "targets (fair): <=1.3x, >=60% fewer"],
    )  # fmt: skip
    references = {k[0]: r for k, r in results.items() if k[1] == REFERENCE and not k[2]}
    best = min((r.makespan_s for r in references.values()), default=math.nan)
    for key, result in results.items():
        policy, mix, bulk = key
        own = references[policy].makespan_s if policy in references else math.nan
        fifo = results.get((FIFO, mix, False))
        section.rows.append(mix_row(key, result, (own, best), fifo))
        section.data.append(run_json(result, mix=mix, bulk=bulk, **usage_json(result)))
        if policy is FAIR and mix != REFERENCE:
            section.notes.extend(timeline_notes(result))
    section.notes.append(
        "loads c+r: checkpoint loads from the emulators' /history (cold = first read of the file "
        "on that instance, r = page-cache reload); sched saw: style_consumer_model_loads_total; "
        "GPU busy: sum(execution_start->end) / (instances x makespan); useful: the same minus "
        "load time; makespan: first publish -> last terminal event"
    )
    return section


def mix_row(
    key: MixKey, result: RunResult, references_s: tuple[float, float], fifo: RunResult | None
) -> list[str]:
    """`references_s`: the makespans of the same policy's and of the fastest one-checkpoint
    run; the target is on the fastest."""
    policy, mix, bulk = key
    use = usage(result.prompts)
    own, ratio = (result.makespan_s / reference_s for reference_s in references_s)
    fewer = 1 - use.loads / usage(fifo.prompts).loads if fifo and fifo is not result else math.nan
    targets = ""
    if policy is FAIR and mix != REFERENCE:
        targets = f"{verdict(ratio <= RATIO_TARGET)}, {verdict(fewer >= FEWER_LOADS_TARGET)}"
    return [
        mix, str(policy), "bulk" if bulk else "interactive", f"{result.makespan_s:.2f} s",
        f"{own:.2f}", f"{ratio:.2f}", f"{use.loads} = {use.loads_cold}+{use.loads_recent}",
        str(result.metric_loads), "-" if math.isnan(fewer) else f"-{pct(fewer)}",
        pct(busy(result, use)), pct(useful(result, use)), targets,
    ]  # fmt: skip


def busy(result: RunResult, use: Usage) -> float:
    return use.busy_s / (result.spec.instances * result.makespan_s)


def useful(result: RunResult, use: Usage) -> float:
    return (use.busy_s - use.load_s) / (result.spec.instances * result.makespan_s)


def usage_json(result: RunResult) -> dict[str, Any]:
    use = usage(result.prompts)
    return {
        "loads": use.loads,
        "loads_cold": use.loads_cold,
        "loads_recent": use.loads_recent,
        "gpu_busy": round(busy(result, use), 4),
        "gpu_useful": round(useful(result, use), 4),
        "task_s": round(use.task_s, 3),
        "instance_timelines": {
            f"comfy-{i}": runs(result.prompts, i, LETTER_OF) for i in range(result.spec.instances)
        },
    }


def timeline_notes(result: RunResult) -> list[str]:
    title = f"  {result.spec.label}: checkpoints run per instance (c/r: began with a load)"
    timelines = (runs(result.prompts, i, LETTER_OF) for i in range(result.spec.instances))
    return [title, *(f"    comfy-{i}: {line}" for i, line in enumerate(timelines))]


# 2. One checkpoint: the ideal


def one_checkpoint(results: dict[SchedulerPolicy, RunResult]) -> Section:
    section = Section(
        "2. one checkpoint: the same replica and instances, all tasks of style a",
        ["policy", "tasks", "makespan", "task time", "ideal", "ideal/makespan",
         "GPU-window util", "target >= 99%"],
    )  # fmt: skip
    for policy, result in results.items():
        use, tasks, instances = usage(result.prompts), len(result.ended), result.spec.instances
        ideal_s = MIX_FAULTS.model_load_seconds + math.ceil(tasks / instances) * use.task_s
        window = use.busy_s / (instances * use.window_s)
        section.rows.append([
            str(policy), str(tasks), f"{result.makespan_s:.2f} s", f"{use.task_s:.3f} s",
            f"{ideal_s:.2f} s", pct(ideal_s / result.makespan_s), pct(window),
            verdict(ideal_s / result.makespan_s >= IDEAL_TARGET),
        ])  # fmt: skip
        section.data.append(
            run_json(result, ideal_s=round(ideal_s, 3), gpu_window_util=round(window, 4))
        )
    section.notes.append(
        "ideal makespan = one cold checkpoint load + ceil(tasks / instances) x task time, where "
        "task time = the median execution_start->success of a prompt less its checkpoint load "
        "(ComfyUI runs one prompt at a time, so 2 slots per instance do not add speed); "
        "GPU-window util = sum(execution) / (instances x (first execution_start -> last end))"
    )
    return section


# 3. A single behind batches


def single_behind(results: dict[SchedulerPolicy, dict[str, RunResult]]) -> Section:
    section = Section(
        "3. one single (interactive) 0.3 s after other users' 50-photo batches (and, fair "
        "only, 3 s after: every instance warm): 1 replica, 4 instances x 2 slots, 0.5 s per "
        "task, no model loads",
        ["policy", "case", "latency", "- alone", "task time", "target <= alone + task",
         "batch tasks ended before it"],
    )  # fmt: skip
    for policy, cases in results.items():
        alone = cases["alone"]
        alone_s = statistics.median(alone.latency_s(t) for t in alone.ended)
        task_s = usage(alone.prompts).task_s
        for case, result in cases.items():
            section.rows.append(single_row(policy, case, result, alone_s, task_s))
            section.data.append(run_json(result, case=case, alone_s=round(alone_s, 3)))
    section.notes.append(
        "latency: publish -> terminal event received; alone: the median of singles run one at "
        "a time; task time: the median execution of a prompt (emulator /history); the "
        "batches are not waited for (the run stops once the single ended)"
    )
    return section


def single_row(
    policy: SchedulerPolicy, case: str, result: RunResult, alone_s: float, task_s: float
) -> list[str]:
    if case == "alone":
        return [str(policy), case, f"{alone_s:.3f} s", "", f"{task_s:.3f} s", "", ""]
    latency = result.latency_s("solo")
    single_end = result.ended["solo"][0]
    before = sum(at < single_end for t, (at, _) in result.ended.items() if t != "solo")
    return [
        str(policy), case, f"{latency:.3f} s", f"+{latency - alone_s:.3f} s", f"{task_s:.3f} s",
        verdict(latency <= alone_s + task_s), str(before),
    ]  # fmt: skip


# 4. Two users' batches


def two_batches(results: dict[SchedulerPolicy, dict[str, RunResult]]) -> Section:
    section = Section(
        "4. two users' 50-photo batches: 1 replica, 4 instances x 2 slots, 0.5 s per task",
        ["policy", "case", "T", "A done/T", "B done/T", "A in first half",
         "A share both pending", "B first done", f"target: shares >= {pct(SHARE_TARGET)}"],
    )  # fmt: skip
    for policy, cases in results.items():
        for case, result in cases.items():
            figures = batch_figures(result)
            section.rows.append(batch_row(policy, case, result.makespan_s, figures))
            section.data.append(run_json(result, case=case, **figures))
    section.notes.append(
        "T: first publish -> last terminal event; X done/T: X's last terminal event / T; "
        "A in first half: A's tasks among the first <batch size> completions; share both "
        "pending: A's part of the completions between B's publish and the first batch's end "
        f"(even share = 50%; target: each user gets >= even share / 1.2 = {pct(SHARE_TARGET)}); "
        "B first done: B's publish -> its first terminal event"
    )
    return section


def batch_figures(result: RunResult) -> dict[str, float]:
    a, b = (w for w in result.spec.workload if isinstance(w, Batch))
    done = {w.batch_id: max(result.done_s(t) for t in w.task_ids()) for w in (a, b)}
    order = sorted(result.ended, key=lambda t: result.ended[t][0])
    mine = set(a.task_ids())
    window = [t for t in order if b.at_s <= result.done_s(t) <= min(done.values())]
    return {
        "a_done_over_t": done[a.batch_id] / result.makespan_s,
        "b_done_over_t": done[b.batch_id] / result.makespan_s,
        "a_in_first_half": sum(t in mine for t in order[: a.size]) / a.size,
        "a_share_both_pending": sum(t in mine for t in window) / max(1, len(window)),
        "b_first_done_s": min(result.done_s(t) for t in b.task_ids()) - b.at_s,
    }


def batch_row(
    policy: SchedulerPolicy, case: str, makespan_s: float, f: dict[str, float]
) -> list[str]:
    share = f["a_share_both_pending"]
    return [
        str(policy), case, f"{makespan_s:.2f} s", f"{f['a_done_over_t']:.2f}",
        f"{f['b_done_over_t']:.2f}", pct(f["a_in_first_half"]), pct(share),
        f"{f['b_first_done_s']:.2f} s", verdict(min(share, 1 - share) >= SHARE_TARGET),
    ]  # fmt: skip


# 5. Three replicas


def three_replicas(results: dict[SchedulerPolicy, RunResult]) -> Section:
    section = Section(
        f"5. three replicas on 8 instances ({'/'.join(map(str, FIVE_REPLICAS))} each, x 2 "
        "slots), three 50-photo batches + singles every 0.4 s, 0.5 s per task, Redis store",
        ["policy", "tasks", "makespan", "idle while other waits", "lost slot-time",
         "idle while queued", "idle beside own waiters", "held > capacity (all/bulk)",
         "singles p50/max", f"target: ~0 (<=1%), bulk <= {WINDOW}"],
    )  # fmt: skip
    for policy, result in results.items():
        section.rows.append(replicas_row(policy, result))
        figures = {k: v for k, v in result.extra.items() if k != "ticks"}
        section.data.append(run_json(result, **figures))
    section.notes.append(
        "sampled every 0.1 s from the Service objects. A replica's free slot is uncovered when "
        "no task it holds is about to take it. Idle while other waits: time during which a "
        "replica had an uncovered free slot while another had a task waiting in its pool that "
        "its own free slots could not take; lost slot-time: those slots x time / (all slots x "
        "makespan); idle while queued: some replica had an uncovered free slot while the "
        "broker held ready messages; idle beside own waiters: a replica had free slots while "
        "tasks waited in its own pool; held > capacity: max over samples of tasks (bulk "
        "tasks) in hand - healthy slots"
    )
    return section


def replicas_row(policy: SchedulerPolicy, result: RunResult) -> list[str]:
    x, span = result.extra, result.makespan_s
    slots = 2 * result.spec.instances
    singles = [result.latency_s(t) for t in result.ended if t.startswith("single-")]
    idle_s, held = x["idle_while_other_waits_s"], x["max_bulk_beyond_capacity"]
    return [
        str(policy), str(len(result.ended)), f"{span:.2f} s",
        f"{pct(idle_s / span)} ({idle_s:.1f} s)",
        pct(x["lost_slot_s"] / (slots * span)), pct(x["idle_while_queued_s"] / span),
        pct(x["idle_beside_own_waiters_s"] / span),
        f"{x['max_beyond_capacity']}/{x['max_bulk_beyond_capacity']}",
        f"{statistics.median(singles):.2f}/{max(singles):.2f} s",
        verdict(idle_s <= 0.01 * span and held <= WINDOW),
    ]  # fmt: skip
