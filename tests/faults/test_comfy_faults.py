"""ComfyUI faults (issue 5, scenarios 4 to 7) under a fixed load through a real replica.

The emulators run in the test process, so each fault is switched on mid-run: an instance
dies and comes back, restarts and forgets its queue and history, drops every WebSocket at
once, or accepts prompts and never finishes them. The shared checker (`run.finish()`)
gives the verdict on the tasks; each test adds what its fault specifically implies.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from consumer.testing.comfyui_emulator import Faults
from tests.broker.ctl import wait_until
from tests.faults.harness import FaultRun, Replica

# 20 sampler steps of 20 ms: a prompt runs ~0.4 s, so a fault always finds one executing.
STEADY = Faults(step_seconds=0.02)
EVENT_TIMEOUT_S = 30.0
VICTIM = "comfy-0"
# A dead instance is probed at most this far apart, so its come-back is seen quickly.
FAST_BREAKER = {"COMFYUI_BREAKER_MAX_BACKOFF_S": "1"}

Event = dict[str, Any]


async def instance_health(replica: Replica, name: str) -> bool:
    """Whether `replica`'s /health reports instance `name` healthy."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{replica.sidecar_url}/health") as response,
    ):
        body = await response.json()
    (instance,) = (i for i in body["instances"] if i["name"] == name)
    return bool(instance["healthy"])


async def wait_health(replica: Replica, name: str, *, healthy: bool) -> None:
    """Poll /health (it has no push) until instance `name` is (un)healthy."""

    async def reached() -> bool:
        return await instance_health(replica, name) is healthy

    await wait_until(reached, EVENT_TIMEOUT_S)


def is_running_on(name: str, run: FaultRun) -> Any:
    """A predicate: a `started` event on instance `name` of a task that has not ended yet."""

    def predicate(event: Event) -> bool:
        return (
            event["event"] == "started"
            and event.get("instance") == name
            and event["task_id"] not in run.events.terminal
        )

    return predicate


def events_of(run: FaultRun, kind: str, instance: str | None = None) -> list[Event]:
    """Events of `kind` (on `instance`, when given)."""
    return [
        e
        for e in run.events.events
        if e["event"] == kind and (instance is None or e.get("instance") == instance)
    ]


def terminal_kinds(run: FaultRun) -> set[str]:
    return {e["event"] for t in run.task_ids for e in run.events.terminal[t]}


async def test_killed_instance_is_readmitted_after_restart(fault_run):
    """One of three instances dies mid-prompt: its prompts move on; restarted, it takes work."""
    async with fault_run(
        "4. comfy instance killed, restarted", faults=STEADY, env=FAST_BREAKER
    ) as run:
        (replica,) = await run.spawn(1)
        await run.publish_tasks(30)
        await run.events.wait_for(is_running_on(VICTIM, run), EVENT_TIMEOUT_S)
        await run.emulators[0].die()
        await replica.wait_log(lambda line: f"{VICTIM} taken out" in line["msg"], EVENT_TIMEOUT_S)
        await run.wait_terminal(len(run.task_ids))
        retried = events_of(run, "retrying", VICTIM)
        await run.emulators[0].restart()
        await wait_health(replica, VICTIM, healthy=True)
        before = {e["event_id"] for e in events_of(run, "started", VICTIM)}
        await run.publish_tasks(30)
        readmitted = await run.events.wait_for(
            lambda e: is_running_on(VICTIM, run)(e) and e["event_id"] not in before,
            EVENT_TIMEOUT_S,
        )
        await run.wait_terminal(len(run.task_ids))
        after = [e for e in events_of(run, "started", VICTIM) if e["event_id"] not in before]
        run.notes.append(
            f"{len(retried)} prompt(s) retried after the kill; {len(after)} ran on {VICTIM}"
            " after its restart"
        )
        row = await run.finish()
    assert retried, f"no prompt was running on {VICTIM} when it died"
    assert {e["error"]["code"] for e in retried} == {"internal_error"}
    assert readmitted["task_id"] in run.task_ids[30:]
    assert terminal_kinds(run) == {"completed"}
    assert row.duplicates == 0


async def test_instance_restart_that_forgets_its_prompts(fault_run):
    """An instance restarts mid-prompt, losing queue and history: its prompts run elsewhere."""
    async with fault_run("5. comfy restart forgets queue+history", faults=STEADY) as run:
        await run.spawn(1)
        await run.publish_tasks(40)
        await run.events.wait_for(is_running_on(VICTIM, run), EVENT_TIMEOUT_S)
        await run.emulators[0].restart()
        await run.wait_terminal(len(run.task_ids))
        retried = events_of(run, "retrying", VICTIM)
        run.notes.append(f"{len(retried)} lost prompt(s) retried")
        row = await run.finish()
    assert retried, f"no prompt of {VICTIM} was noticed lost"
    assert terminal_kinds(run) == {"completed"}
    assert row.duplicates == 0


async def test_websockets_dropped_on_every_instance_at_once(fault_run):
    """Every instance drops its WebSocket mid-prompt at once: every task still completes."""
    async with fault_run("6. WebSocket dropped on every instance", faults=STEADY) as run:
        await run.spawn(1)
        await run.publish_tasks(45)
        await run.wait_terminal(10)
        for emulator in run.emulators:
            emulator.faults.drop_ws_after_steps = 5
        await run.wait_terminal(len(run.task_ids))
        run.notes.append(f"{len(events_of(run, 'retrying'))} retry(ies) after the drops")
        row = await run.finish()
    assert all(e.faults.drop_ws_after_steps is None for e in run.emulators), "a drop never fired"
    assert terminal_kinds(run) == {"completed"}
    assert row.duplicates == 0


async def test_stuck_instance_times_out_and_its_breaker_opens(fault_run):
    """An instance that never finishes: prompts time out, retry elsewhere, its breaker opens."""
    options = {"faults": STEADY, "env": {"EXECUTION_TIMEOUT_S": "1.5"}}
    stuck = "comfy-1"
    async with fault_run("7. stuck instance: timeout, breaker", **options) as run:
        (replica,) = await run.spawn(1)
        await run.publish_tasks(45)
        await run.wait_terminal(10)
        run.emulators[1].faults.hang = True
        timed_out = await run.events.wait_for(
            lambda e: e["event"] == "retrying" and e.get("instance") == stuck, EVENT_TIMEOUT_S
        )
        await replica.wait_log(lambda line: f"{stuck} taken out" in line["msg"], EVENT_TIMEOUT_S)
        await wait_health(replica, stuck, healthy=False)
        await run.wait_terminal(len(run.task_ids))
        timeouts = [e for e in events_of(run, "retrying", stuck) if e["error"]["code"] == "timeout"]
        breaker = [line["msg"] for line in replica.logs if f"{stuck} taken out" in line["msg"]]
        run.notes.append(f"{len(timeouts)} timeout(s) on {stuck}, breaker opened {len(breaker)}x")
        row = await run.finish()
    assert timed_out["error"]["code"] == "timeout", timed_out["error"]
    assert "EXECUTION_TIMEOUT_S" in timed_out["error"]["message"]
    assert terminal_kinds(run) == {"completed"}
    assert row.duplicates == 0
    assert any("breaker open" in msg for msg in breaker), breaker
