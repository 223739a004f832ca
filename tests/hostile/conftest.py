"""Hostile-input suite fixtures: `hostile_run` builds a world (real replica process, real
broker, emulated ComfyUI); each case adds a row to the table printed at the end.

Every test under tests/hostile/ that starts a replica is marked `connected` and `slow`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Any

import pytest

from tests.faults.harness import FaultConfig, FaultRun, open_fault_run
from tests.hostile.cases import ROWS, HostileRow
from tests.summary import write_table

HEADER = ("case", "field", "expected", "got", "seconds")
HERE = Path(__file__).parent


def pytest_configure(config: pytest.Config) -> None:
    config.stash[ROWS] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.path)).parents and "hostile_run" in getattr(
            item, "fixturenames", ()
        ):
            item.add_marker(pytest.mark.connected)
            item.add_marker(pytest.mark.slow)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    rows: list[HostileRow] = config.stash.get(ROWS, [])
    if not rows:
        return
    cells = [(r.case, r.field, r.expected, r.got, f"{r.seconds:.2f}") for r in rows]
    held = sum(1 for r in rows if r.expected == r.got)
    footer = f"{held} of {len(rows)} case(s) ended as expected"
    write_table(terminalreporter, "hostile input summary", HEADER, cells, footer)


RunFactory = Callable[..., AbstractAsyncContextManager[FaultRun]]


@pytest.fixture
def hostile_run(
    request: pytest.FixtureRequest, amqp_url: str, redis_url: str, tmp_path: Path
) -> RunFactory:
    """`async with hostile_run(**FaultConfig options) as run:` a world for hostile cases."""

    def make(**options: Any) -> AbstractAsyncContextManager[FaultRun]:
        prefix = f"h{uuid.uuid4().hex[:10]}"
        workdir = tmp_path / prefix
        workdir.mkdir()
        config = FaultConfig(
            scenario=request.node.name,
            amqp_url=amqp_url,
            redis_url=redis_url,
            workdir=workdir,
            prefix=prefix,
            instances=1,
            **options,
        )
        return open_fault_run(config, [])  # the fault table is not ours: rows go to ROWS

    return make


@pytest.fixture
def hostile_rows(request: pytest.FixtureRequest) -> list[HostileRow]:
    rows: list[HostileRow] = request.config.stash[ROWS]
    return rows
