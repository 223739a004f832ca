"""One hostile case: publish a message whose field an attacker (or a careless client) wrote,
then wait for what must follow: a `failed` event with its code, a dead letter with its code,
or a completed task that ignored the field. Each case becomes a row of the summary table.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from tests.broker.ctl import wait_until
from tests.faults.harness import FaultRun
from tests.faults.test_poison_and_inputs import peek_dead_letter_headers

ROWS = pytest.StashKey[list["HostileRow"]]()
CASE_TIMEOUT_S = 20.0
TERMINAL = frozenset({"completed", "failed", "cancelled"})


@dataclass(frozen=True)
class HostileRow:
    case: str
    field: str
    expected: str
    got: str
    seconds: float


@dataclass(frozen=True)
class Expect:
    """What a case must end with. `event`: the terminal event and code of `task_id`
    ("completed", or "failed:<code>"); `dead`: the dead letter's x-error-code."""

    task_id: str | None = None
    event: str | None = None
    dead: str | None = None

    def describe(self) -> str:
        parts = [
            f"event {self.event}" if self.event else "",
            f"dead {self.dead}" if self.dead else "",
        ]
        return ", ".join(p for p in parts if p) or "nothing"


class Cases:
    """Runs cases against one world, one after another, recording a row for each."""

    def __init__(self, run: FaultRun, rows: list[HostileRow]) -> None:
        self.run = run
        self.rows = rows
        self.failures: list[str] = []

    async def check(
        self,
        case: str,
        field: str,
        body: bytes,
        expect: Expect,
        routing_key: str = "transform",
        **props: Any,
    ) -> dict[str, Any] | None:
        """Publish `body`, wait for `expect`; returns the terminal event if one was expected."""
        started = time.monotonic()
        await self.run.publish(body, routing_key, poison=expect.dead is not None, **props)
        event = await self._event(expect)
        dead = await self._dead(body) if expect.dead else None
        got = Expect(expect.task_id, _outcome(event), dead).describe()
        self.rows.append(
            HostileRow(case, field, expect.describe(), got, time.monotonic() - started)
        )
        if got != expect.describe():
            self.failures.append(f"{case}: expected {expect.describe()}, got {got}")
        if event is not None and expect.task_id is not None:
            self.run.task_ids.append(expect.task_id)  # the final check covers it too
        return event

    async def check_matching(
        self,
        case: str,
        field: str,
        body: bytes,
        match: Callable[[dict[str, Any]], bool],
        expected: str,
        **props: Any,
    ) -> dict[str, Any]:
        """Publish `body` and wait for the terminal event `match` picks (its id is not ours)."""
        started = time.monotonic()
        await self.run.publish(body, **props)
        event = await self.run.events.wait_for(
            lambda e: match(e) and e.get("event") in TERMINAL, CASE_TIMEOUT_S
        )
        got = _outcome(event) or "nothing"
        self.rows.append(HostileRow(case, field, expected, got, time.monotonic() - started))
        if got != expected:
            self.failures.append(f"{case}: expected {expected}, got {got}")
        return event

    async def _event(self, expect: Expect) -> dict[str, Any] | None:
        if expect.event is None or expect.task_id is None:
            return None
        return await self.run.events.wait_for(
            lambda e: e.get("task_id") == expect.task_id and e.get("event") in TERMINAL,
            CASE_TIMEOUT_S,
        )

    async def _dead(self, body: bytes) -> str:
        run = self.run

        async def arrived() -> bool:
            return await run.queue_depth(run.topology.dead) >= len(run.poison)

        await wait_until(arrived, CASE_TIMEOUT_S)
        headers = await peek_dead_letter_headers(run, body)
        return _text(headers.get("x-error-code"))


def _outcome(event: dict[str, Any] | None) -> str | None:
    if event is None:
        return None
    code = (event.get("error") or {}).get("code")
    return f"{event['event']}:{code}" if code else str(event["event"])


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
