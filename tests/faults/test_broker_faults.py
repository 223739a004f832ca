"""Broker faults (issue 5, scenarios 2 and 3) on the shared local RabbitMQ.

Every test restores the broker in `finally` (start_app, default watermark, await_startup)
through the `broker_restored` fixture, and leaves it running for the rest of the suite.
"""

from __future__ import annotations

import asyncio

from consumer.testing.comfyui_emulator import Faults
from tests.faults.harness_broker import (
    clear_memory_alarm,
    close_all_connections,
    raise_memory_alarm,
    start_app,
    stop_app,
)

# ~0.4 s a prompt on each of three instances: tasks are in flight whenever the fault hits.
STEADY = Faults(step_seconds=0.02)
# Publishes time out fast while the broker is away, so retries (and their log lines) come soon.
FAST_PUBLISH = {"AMQP_PUBLISH_TIMEOUT_S": "1"}
BLOCKED_WAIT_S = 30.0


async def test_broker_stopped_and_started_mid_run(fault_run, broker_restored):
    """stop_app/start_app mid-run: replicas reconnect and every task ends exactly once."""
    async with fault_run("2a. broker stop_app/start_app", faults=STEADY, env=FAST_PUBLISH) as run:
        await run.spawn(2)
        await run.publish_tasks(40)
        await run.wait_terminal(10)
        try:
            await stop_app()
        finally:
            await start_app()
        row = await run.finish()
    assert row.lost == 0


async def test_all_connections_force_closed_mid_run(fault_run):
    """close_all_connections mid-run: replicas reconnect and every task ends exactly once."""
    async with fault_run("2b. close_all_connections", faults=STEADY, env=FAST_PUBLISH) as run:
        await run.spawn(2)
        await run.publish_tasks(40)
        await run.wait_terminal(10)
        await close_all_connections("test")
        row = await run.finish()
    assert row.lost == 0


async def test_memory_alarm_blocks_publishing_and_nothing_is_lost(fault_run, broker_restored):
    """A memory alarm blocks publishers: replicas wait (alive), then finish everything."""
    async with fault_run("3. memory alarm", faults=STEADY, env=FAST_PUBLISH) as run:
        replicas = await run.spawn(2)
        await run.publish_tasks(40)
        await run.wait_terminal(10)
        try:
            await raise_memory_alarm()
            await run.wait_log_any(
                lambda line: "not confirmed" in str(line.get("msg")), BLOCKED_WAIT_S
            )
            late = asyncio.create_task(run.publish_tasks(10))  # a backend, blocked as well
            assert all(r.running for r in replicas), "a replica died under the memory alarm"
        finally:
            await clear_memory_alarm()
        await late
        row = await run.finish()
    assert row.lost == 0
