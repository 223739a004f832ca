"""Process faults (issue 5, scenarios 1 and 8) and several replicas sharing one queue.

Each scenario runs a fixed load through real `python -m consumer` processes, injects the
fault mid-run and leaves the verdict to the shared checker (`FaultRun.finish`).
"""

from __future__ import annotations

import asyncio

from consumer.testing.comfyui_emulator import Faults

# An instance runs one prompt at a time (as ComfyUI does), so three instances finish about
# 3 / prompt_s tasks a second. 20 sampler steps of 20 ms: ~0.4 s a prompt, so a fault always
# finds tasks in flight.
STEADY = Faults(step_seconds=0.02)
# 20 steps of 60 ms: ~1.2 s a prompt, far longer than a 0.2 s shutdown grace.
SLOW = Faults(step_seconds=0.06)


async def test_kill_9_of_the_only_replica(fault_run):
    """kill -9 of the only replica mid-run: a fresh replica finishes every task, none lost."""
    async with fault_run("1a. kill -9, single replica", faults=STEADY) as run:
        (replica,) = await run.spawn(1)
        await run.publish_tasks(40)
        await run.wait_terminal(12)
        assert await replica.kill() == -9
        await run.spawn(1)
        row = await run.finish()
    assert row.lost == 0


async def test_kill_9_of_one_of_three_replicas(fault_run):
    """kill -9 of one of three replicas mid-run: the other two finish its tasks, none lost."""
    async with fault_run("1b. kill -9, one of three", faults=STEADY) as run:
        replicas = await run.spawn(3)
        await run.publish_tasks(60)
        await run.wait_terminal(20)
        assert await replicas[0].kill() == -9
        row = await run.finish()
    assert row.lost == 0


async def test_sigterm_lets_in_flight_tasks_finish_within_grace(fault_run):
    """SIGTERM mid-run: the replica finishes what it runs, exits 0; the other one does the rest."""
    # The grace is generous on purpose: the point is that tasks in hand finish, and on a
    # loaded 2-core machine the ~1 s they need can stretch well past the harness's 10 s.
    options = {"faults": STEADY, "env": {"SHUTDOWN_GRACE_S": "40"}}
    async with fault_run("8a. SIGTERM, tasks finish in grace", **options) as run:
        replicas = await run.spawn(2)
        await run.publish_tasks(40)
        await run.wait_terminal(12)
        assert await replicas[0].terminate(timeout_s=60) == 0
        assert not replicas[0].lines("grace period over")
        assert replicas[0].lines("stopped")
        row = await run.finish()
    assert (row.lost, row.duplicates) == (0, 0)


async def test_sigterm_past_grace_redelivers_in_flight_tasks(fault_run):
    """SIGTERM with a short grace: interrupted tasks are redelivered and completed elsewhere."""
    options = {"faults": SLOW, "env": {"SHUTDOWN_GRACE_S": "0.2"}}
    async with fault_run("8b. SIGTERM, grace over, redelivered", **options) as run:
        replicas = await run.spawn(2)
        await run.publish_tasks(18)
        await run.wait_terminal(3)
        assert await replicas[0].terminate() == 0
        interrupted = replicas[0].lines("grace period over")
        assert interrupted, "the first replica had nothing in flight when it was stopped"
        run.notes.append(interrupted[0]["msg"])
        row = await run.finish()
    assert (row.lost, row.duplicates) == (0, 0)


async def test_every_replica_sees_every_task(fault_run):
    """Three replicas on one queue share the work; lookups on any replica find every task."""
    async with fault_run("multi-replica: lookups on any replica") as run:
        replicas = await run.spawn(3)
        ids = await run.publish_tasks(60)
        await run.wait_terminal(len(ids))
        for replica in replicas:
            found = await asyncio.gather(*(run.lookup(replica, task_id) for task_id in ids))
            statuses = {record["status"] if record else None for record in found}
            assert statuses == {"completed"}, f"{replica!r} sees {statuses}"
        workers = [r for r in replicas if r.lines("task completed")]
        run.notes.append(f"{len(workers)} of 3 replicas ran tasks")
        row = await run.finish()
    assert len(workers) >= 2, "the work was not shared"
    assert (row.lost, row.duplicates) == (0, 0)
