"""Workloads and runs of the scheduling benchmark's scenarios (see tests/bench/scheduling.py).

Every scenario runs each policy (`SCHEDULER=fifo`, the baseline, and `fair`) on fresh
emulators with the same workload. Styles a, b and c share one template and differ only in
their checkpoint (the benchmark's own styles.toml, `steps = 2`).
"""

from __future__ import annotations

from dataclasses import dataclass

from consumer.settings import SchedulerPolicy
from consumer.testing.comfyui_emulator import DEFAULT_CHECKPOINTS, Faults
from tests.bench.sched_probe import sample_replicas
from tests.bench.sched_run import Batch, Rig, RunResult, RunSpec, Single, Work, run

FIFO, FAIR = SchedulerPolicy.FIFO, SchedulerPolicy.FAIR
POLICIES = (FIFO, FAIR)
STEPS = 2
MIX_FAULTS = Faults(step_seconds=0.25, model_load_seconds=3.0)  # 0.5 s sampling, 3 s cold load
FLAT_FAULTS = Faults(step_seconds=0.25)  # 0.5 s sampling, loads free: scenarios 3 to 5
STYLE_OF = {"A": "a", "B": "b", "C": "c"}
CHECKPOINT_OF = dict(zip(STYLE_OF.values(), DEFAULT_CHECKPOINTS, strict=True))
LETTER_OF = {CHECKPOINT_OF[style]: letter for letter, style in STYLE_OF.items()}
MIXES = {"one checkpoint": "A", "2:1 (a)": "AAB", "1:1:1 (b)": "ABC"}
REFERENCE = "one checkpoint"
SINGLE_AFTER_S = 0.3  # scenario 3: the single follows the batches by this much
STEADY_AFTER_S = 3.0  # scenario 3, fair only: the same once every instance is warm
LATE_BATCH_S = 2.0  # scenario 4: batch B follows batch A by this much
ALONE_SPACING_S = 1.5  # scenario 3: singles alone, one at a time
FIVE_REPLICAS = (3, 3, 2)  # scenario 5: instances of each of the three replicas


@dataclass(frozen=True)
class Sizes:
    mix_tasks: int = 80
    batch: int = 50
    singles: int = 20  # scenario 5
    alone: int = 3  # scenario 3: singles run alone (their median is "alone")


QUICK = Sizes(mix_tasks=40, batch=20, singles=8, alone=2)


# 1 and 2. Checkpoint mixes, published at once


def mix_workload(tasks: int, pattern: str, bulk: bool) -> tuple[Work, ...]:
    """`tasks` singles whose styles follow `pattern` over and over (A A B A A B ...)."""
    return tuple(
        Single(f"t{i:03d}", "u-mix", STYLE_OF[pattern[i % len(pattern)]], bulk=bulk)
        for i in range(tasks)
    )


def mix_spec(sizes: Sizes, policy: SchedulerPolicy, mix: str, bulk: bool) -> RunSpec:
    mode = "bulk" if bulk else "interactive"
    workload = mix_workload(sizes.mix_tasks, MIXES[mix], bulk)
    return RunSpec(f"{mix} {policy} {mode}", policy, MIX_FAULTS, workload)


def mix_runs(bulk_too: bool) -> list[tuple[SchedulerPolicy, str, bool]]:
    """(policy, mix, bulk) of scenario 1: both policies on every mix, interactive; and the
    fair policy on the mixes published as bulk work."""
    runs = [(policy, mix, False) for mix in MIXES for policy in POLICIES]
    if bulk_too:
        runs += [(FAIR, mix, True) for mix in MIXES if mix != REFERENCE]
    return runs


async def run_mixes(
    rig: Rig, sizes: Sizes, runs: list[tuple[SchedulerPolicy, str, bool]]
) -> dict[tuple[SchedulerPolicy, str, bool], RunResult]:
    return {key: await run(rig, mix_spec(sizes, *key)) for key in runs}


# 3. A single behind other users' batches


def batches(count: int, size: int, at_s: float = 0.0) -> list[Batch]:
    users = "abcdefgh"[:count]
    return [Batch(f"batch-{u}", f"u-{u}", "a", size, at_s) for u in users]


async def single_behind(rig: Rig, sizes: Sizes, policy: SchedulerPolicy) -> dict[str, RunResult]:
    """Singles alone (one at a time), then one single behind one and behind three batches."""
    alone = tuple(
        Single(f"alone-{i}", "u-solo", "a", at_s=i * ALONE_SPACING_S) for i in range(sizes.alone)
    )
    results = {"alone": await run(rig, RunSpec(f"alone {policy}", policy, FLAT_FAULTS, alone))}
    cases = [(1, SINGLE_AFTER_S), (3, SINGLE_AFTER_S)]
    if policy is FAIR:
        cases.append((3, STEADY_AFTER_S))
    for count, after_s in cases:
        case = f"behind {count}" + (f", at +{after_s:g} s" if after_s != SINGLE_AFTER_S else "")
        single = Single("solo", "u-solo", "a", at_s=after_s)
        spec = RunSpec(
            f"{case} {policy}",
            policy,
            FLAT_FAULTS,
            (*batches(count, sizes.batch), single),
            wait_for=frozenset({single.task_id}),
            overrides={"shutdown_grace_s": 0.0},  # the batches are not waited for
        )
        results[case] = await run(rig, spec)
    return results


# 4. Two users' batches


async def two_batches(rig: Rig, sizes: Sizes, policy: SchedulerPolicy) -> dict[str, RunResult]:
    together = tuple(batches(2, sizes.batch))
    first, second = together
    late = (first, Batch(second.batch_id, second.user, second.style, second.size, LATE_BATCH_S))
    return {
        "together": await run(rig, RunSpec(f"together {policy}", policy, FLAT_FAULTS, together)),
        f"B +{LATE_BATCH_S:g} s": await run(
            rig, RunSpec(f"late {policy}", policy, FLAT_FAULTS, late)
        ),
    }


# 5. Three replicas, mixed load


def mixed_load(sizes: Sizes) -> tuple[Work, ...]:
    singles = [
        Single(f"single-{i}", f"u-s{i % 4}", "a", at_s=0.5 + 0.4 * i) for i in range(sizes.singles)
    ]
    return (*batches(3, sizes.batch), *singles)


async def three_replicas(rig: Rig, sizes: Sizes, policy: SchedulerPolicy) -> RunResult:
    spec = RunSpec(
        f"3 replicas {policy}",
        policy,
        FLAT_FAULTS,
        mixed_load(sizes),
        replicas=FIVE_REPLICAS,
        shared_store=True,  # replicas share task and batch records, as deployed
    )
    return await run(rig, spec, probe=sample_replicas)
