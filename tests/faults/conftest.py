"""Fault-suite fixtures: `fault_run` builds a scenario's world; the summary table at the end.

Every test under tests/faults/ is marked `connected` and `slow`.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import FaultConfig, FaultRun, SummaryRow, open_fault_run
from tests.faults.harness_broker import restore_broker
from tests.summary import write_table

ROWS = pytest.StashKey[list[SummaryRow]]()
HEADER = ("scenario", "tasks", "terminal events", "duplicates", "lost", "seconds", "notes")
HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.connected)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows = config.stash.get(ROWS, [])
    if not rows:
        return
    cells = [
        (
            r.scenario,
            str(r.tasks),
            str(r.terminal_events),
            str(r.duplicates),
            str(r.lost),
            f"{r.seconds:.1f}",
            r.notes,
        )
        for r in rows
    ]
    total_s = sum(r.seconds for r in rows)
    footer = f"{len(rows)} scenario(s), {total_s:.1f} s in scenarios"
    write_table(terminalreporter, "fault suite summary", HEADER, cells, footer)


RunFactory = Callable[..., AbstractAsyncContextManager[FaultRun]]


@pytest.fixture
def fault_run(
    request: pytest.FixtureRequest, amqp_url: str, redis_url: str, tmp_path: Path
) -> RunFactory:
    """`async with fault_run(scenario=None, **FaultConfig options) as run:` one scenario."""
    rows = request.config.stash[ROWS]

    def make(scenario: str | None = None, **options: Any) -> AbstractAsyncContextManager[FaultRun]:
        prefix = f"f{uuid.uuid4().hex[:10]}"
        workdir = tmp_path / prefix
        workdir.mkdir()
        config = FaultConfig(
            scenario=scenario or request.node.name,
            amqp_url=amqp_url,
            redis_url=redis_url,
            workdir=workdir,
            prefix=prefix,
            **options,
        )
        return open_fault_run(config, rows)

    return make


@pytest.fixture
async def broker_restored() -> AsyncIterator[None]:
    """For tests that break the shared broker: start_app, watermark back, await_startup."""
    try:
        yield
    finally:
        await restore_broker()
