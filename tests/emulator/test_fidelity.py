"""Fidelity: the emulator answers our scenario runner exactly like the recorded ComfyUI 0.8.0."""

from __future__ import annotations

import json
from pathlib import Path

from consumer.testing import ComfyEmulator, Faults
from tests.emulator.compare import compare
from tests.emulator.scenario_runs import SCENARIOS

TRACES = Path(__file__).resolve().parents[1] / "data" / "comfyui-traces"


def _recorded(name: str) -> list[dict]:
    return json.loads((TRACES / f"{name}.json").read_text())


async def test_all_scenarios_match_the_recorded_traces(tmp_path: Path) -> None:
    """All scenarios of record.py, run in order on one emulator: zero structural differences."""
    faults = Faults(step_seconds=0.0, node_seconds=0.2)
    report: dict[str, list[str]] = {}
    async with ComfyEmulator(faults, tmp_path) as comfy:
        for name, scenario in SCENARIOS.items():
            report[name] = compare(_recorded(name), await scenario(comfy.url))
    found = {name: diffs for name, diffs in report.items() if diffs}
    for name, diffs in found.items():
        print(f"--- {name}: {len(diffs)} differences")  # noqa: T201
        for diff in diffs:
            print("   ", diff)  # noqa: T201
    assert not found, f"structural differences in {sorted(found)} (printed above)"
