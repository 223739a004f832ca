"""The fault suite's checker: what must hold after every scenario, and its summary row.

- every task id has exactly one terminal state in the store, and it is the outcome of its
  terminal events (which never disagree with each other);
- the independent subscriber received a terminal event for every task (lost = those without);
- duplicate terminal events are counted and reported (at-least-once publishing);
- no replica ended on its own; every running one stops cleanly (SIGTERM, exit code 0);
- nothing is left in `<prefix>.transform` nor `<prefix>.transform.bulk`;
- `<prefix>.dead` holds exactly the poison messages sent, nothing else (they are taken out
  and kept in `run.dead_letters`, headers included, for the scenario's own assertions).
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aio_pika
from aio_pika.abc import AbstractChannel

from consumer.state import TaskRecord, task_key
from consumer.topology import Topology
from tests.broker.ctl import wait_until

if TYPE_CHECKING:
    from tests.faults.harness import FaultRun

STORE_CHUNK = 1000
DRAIN_TIMEOUT_S = 30.0
MAX_LISTED = 5


@dataclass(frozen=True)
class SummaryRow:
    """One line of the table printed at the end of the run."""

    scenario: str
    tasks: int
    terminal_events: int
    duplicates: int
    lost: int
    seconds: float
    notes: str = ""


@asynccontextmanager
async def plain_channel(amqp_url: str) -> AsyncIterator[AbstractChannel]:
    """A channel on a fresh, non-robust connection.

    A robust channel that has reconnected answers a passive declare with the message count
    it saw before the reconnect (aio-pika restores the queue object), so checks never use one.
    """
    async with await aio_pika.connect(amqp_url) as connection:
        yield await connection.channel()


async def queue_depth(amqp_url: str, name: str) -> int:
    """Ready messages in queue `name` (passive declare; unacked ones are not counted)."""
    async with plain_channel(amqp_url) as channel:
        queue = await channel.declare_queue(name, passive=True)
        return int(queue.declaration_result.message_count or 0)


@dataclass(frozen=True)
class DeadLetter:
    """A message taken out of `<prefix>.dead`: body and headers (x-death, x-error-code...)."""

    body: bytes
    headers: dict[str, Any]


async def take_dead_letters(amqp_url: str, topology: Topology) -> list[DeadLetter]:
    """Take every message out of `<prefix>.dead`."""
    async with plain_channel(amqp_url) as channel:
        queue = await channel.declare_queue(topology.dead, passive=True)
        taken = []
        while (message := await queue.get(no_ack=True, fail=False)) is not None:
            taken.append(DeadLetter(message.body, dict(message.headers)))
        return taken


async def read_records(run: FaultRun, task_ids: list[str]) -> list[TaskRecord | None]:
    """The store's records of `task_ids`, in order: one MGET per chunk (`task:<user>/<id>`)."""
    records: list[TaskRecord | None] = []
    for first in range(0, len(task_ids), STORE_CHUNK):
        chunk = task_ids[first : first + STORE_CHUNK]
        keys = [f"{run.redis_prefix}task:{task_key(run.owner(t), t)}" for t in chunk]
        values = await run.redis.mget(keys)
        records.extend(TaskRecord.model_validate_json(v) if v else None for v in values)
    return records


async def check_run(run: FaultRun, timeout_s: float) -> SummaryRow:
    """Wait for coverage, stop the replicas, check everything; record the row, then assert."""
    ids = set(run.task_ids)
    with contextlib.suppress(TimeoutError):
        await run.wait_terminal(len(ids), timeout_s)
    with contextlib.suppress(TimeoutError):
        await _settled(run)
    exit_codes = await run.stop_replicas()
    await _drain_subscriber(run)
    problems = [
        *_event_problems(run, ids),
        *await _store_problems(run, ids),
        *await _queue_problems(run),
    ]
    if crashed := {r.name: r.unexpected_exits for r in run.replicas if r.unexpected_exits}:
        problems.append(f"replicas ended on their own (exit codes): {crashed}")
    if any(code != 0 for code in exit_codes):
        problems.append(f"replicas exited with {exit_codes} on SIGTERM (want 0)")
    row = _row(run, ids)
    run.rows.append(row)
    assert not problems, f"{run.config.scenario}: " + "\n".join(problems)
    return row


def _row(run: FaultRun, ids: set[str]) -> SummaryRow:
    terminal = sum(len(run.events.terminal.get(t, ())) for t in ids)
    lost = len(ids) - run.events.terminal_count(ids)
    return SummaryRow(
        scenario=run.config.scenario,
        tasks=len(ids),
        terminal_events=terminal,
        duplicates=run.events.duplicates(ids),
        lost=lost,
        seconds=round(run.elapsed_s(), 1),
        notes="; ".join([*run.notes, *_duplicate_note(run, ids)]),
    )


def _duplicate_note(run: FaultRun, ids: set[str]) -> list[str]:
    duplicates = run.events.duplicates(ids)
    if not duplicates:
        return []
    distinct = run.events.distinct_duplicates(ids)
    return [f"duplicates: {duplicates - distinct} same event_id, {distinct} new event_id"]


async def _settled(run: FaultRun) -> None:
    """Until the work queue has nothing ready: redelivered duplicates were taken too.

    (A graceful stop then finishes whatever the replicas hold; the final check counts again.)
    """

    async def empty() -> bool:
        depths = [await run.queue_depth(q) for q in (run.topology.transform, run.topology.bulk)]
        return not any(depths)

    await wait_until(empty, DRAIN_TIMEOUT_S)


async def _drain_subscriber(run: FaultRun) -> None:
    async def drained() -> bool:
        return await run.queue_depth(run.events.queue_name) == 0

    await wait_until(drained, DRAIN_TIMEOUT_S)


def _listed(items: list[str]) -> str:
    more = f" (+{len(items) - MAX_LISTED} more)" if len(items) > MAX_LISTED else ""
    return ", ".join(sorted(items)[:MAX_LISTED]) + more


def _event_problems(run: FaultRun, ids: set[str]) -> list[str]:
    problems = []
    lost = [t for t in ids if t not in run.events.terminal]
    if lost:
        problems.append(f"{len(lost)} task(s) without a terminal event: {_listed(lost)}")
    if conflicts := run.events.conflicting(ids):
        problems.append(f"terminal events disagree: {dict(list(conflicts.items())[:MAX_LISTED])}")
    return problems


async def _store_problems(run: FaultRun, ids: set[str]) -> list[str]:
    ordered = sorted(ids)
    records = await read_records(run, ordered)
    missing = [t for t, r in zip(ordered, records, strict=True) if r is None]
    open_ = [r.task_id for r in records if r is not None and not r.status.is_terminal]
    mismatched = [
        r.task_id
        for r in records
        if r is not None and r.task_id in run.events.terminal and not _agrees(run, r.task_id, r)
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} task(s) missing from the store: {_listed(missing)}")
    if open_:
        problems.append(f"{len(open_)} task(s) not terminal in the store: {_listed(open_)}")
    if mismatched:
        problems.append(f"store and events disagree for {_listed(mismatched)}")
    return problems


def _agrees(run: FaultRun, task_id: str, record: TaskRecord) -> bool:
    return all(e["event"] == record.status for e in run.events.terminal[task_id])


async def _queue_problems(run: FaultRun) -> list[str]:
    problems = []
    for queue in (run.topology.transform, run.topology.bulk):
        left = await run.queue_depth(queue)
        problems += [f"{left} message(s) left in {queue}"] if left else []
    run.dead_letters = await take_dead_letters(run.config.amqp_url, run.topology)
    dead = Counter(letter.body for letter in run.dead_letters)
    expected = Counter(run.poison)
    if dead != expected:
        extra = sum((dead - expected).values())
        missing = sum((expected - dead).values())
        problems.append(
            f"dead letters differ from the poison sent: {extra} unexpected, {missing} missing"
            f" (first unexpected: {next(iter(dead - expected), b'')[:200]!r})"
        )
    return problems
