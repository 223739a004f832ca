"""The scheduler against the baseline, end to end: `python -m tests.bench.scheduling`.

Each scenario runs `SCHEDULER=fifo` (arrival order, least-loaded instance: the baseline)
and `SCHEDULER=fair` (model affinity, interactive before bulk, fair turns) on the real
broker, with fresh emulated ComfyUI instances in child processes per run:

  1. mixed checkpoints: 80 single requests published at once, styles interleaved 2:1
     (A A B ...) or 1:1:1 (A B C ...) over checkpoints that cost 3 s to load (0.96 s from
     the page cache), sampling 0.5 s; against the one-checkpoint run. Makespan, loads,
     GPU utilisation. Also the fair policy with the same requests published as bulk.
  2. one checkpoint: makespan against the ideal (defined in its table).
  3. one single 0.3 s after one, then three, other users' 50-photo batches: its latency
     against its latency alone.
  4. two users' 50-photo batches, together and 2 s apart: how completions interleave.
  5. three replicas (3/3/2 instances) under batches plus singles: time a replica had a free
     slot while another had a task waiting, bulk held beyond capacity.

`--quick` shrinks every workload; `--scenario N` (repeatable) runs some; `--json PATH`
writes every figure, per-instance timeline and sample. Needs RabbitMQ on 127.0.0.1:5672
(or `--amqp-url`). Every run declares its own AMQP prefix and deletes it at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from consumer.settings import REPO_ROOT
from tests.bench import rig, sched_report, sched_scenarios
from tests.bench.sched_report import Section
from tests.bench.sched_run import Rig
from tests.bench.sched_scenarios import (
    CHECKPOINT_OF,
    POLICIES,
    QUICK,
    REFERENCE,
    STEPS,
    Sizes,
)
from tests.bench.service import BURST_PHOTO
from tests.summary import write_table

TEMPLATE = "img2img_sd15.json"


@dataclass(frozen=True)
class Options:
    amqp_url: str
    scenarios: frozenset[int]
    sizes: Sizes
    bulk: bool
    json_path: Path | None
    inline_emulators: bool


def styles_toml() -> str:
    """Styles a, b, c: one template, `steps = 2`, a checkpoint each."""
    lines = [
        "[defaults]",
        f'template = "{TEMPLATE}"',
        'prompt = "bench"',
        'negative_prompt = "blurry"',
        "strength = 0.6",
        f"steps = {STEPS}",
        "cfg = 7.0",
        'sampler_name = "euler"',
        'scheduler = "normal"',
    ]
    for style, checkpoint in CHECKPOINT_OF.items():
        lines += ["", f"[styles.{style}]", f'checkpoint = "{checkpoint}"']
    return "\n".join(lines) + "\n"


def workflows(folder: Path) -> Path:
    (folder / "templates").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "workflows" / "templates" / TEMPLATE, folder / "templates")
    (folder / "styles.toml").write_text(styles_toml())
    return folder


# Scenarios


PER_POLICY = {  # scenario: (its runs under one policy, its table)
    3: (sched_scenarios.single_behind, sched_report.single_behind),
    4: (sched_scenarios.two_batches, sched_report.two_batches),
    5: (sched_scenarios.three_replicas, sched_report.three_replicas),
}


async def scenarios(options: Options, rig_: Rig) -> list[Section]:
    sections = await mixes(options, rig_) if options.scenarios & {1, 2} else []
    for number, (scenario, table) in PER_POLICY.items():
        if number in options.scenarios:
            started_s = time.perf_counter()
            results = {p: await scenario(rig_, options.sizes, p) for p in POLICIES}
            progress(str(number), started_s)
            sections.append(table(results))  # type: ignore[operator]  # each its own type
    return sections


async def mixes(options: Options, rig_: Rig) -> list[Section]:
    """Scenarios 1 and 2 (whose runs are the one-checkpoint runs of scenario 1)."""
    started_s, wanted = time.perf_counter(), options.scenarios
    runs = sched_scenarios.mix_runs(options.bulk) if 1 in wanted else []
    runs = runs or [(policy, REFERENCE, False) for policy in POLICIES]
    results = await sched_scenarios.run_mixes(rig_, options.sizes, runs)
    progress("1/2", started_s)
    sections = [sched_report.mixes(results)] if 1 in wanted else []
    if 2 in wanted:
        refs = {policy: results[policy, REFERENCE, False] for policy in POLICIES}
        sections.append(sched_report.one_checkpoint(refs))
    return sections


def progress(name: str, started_s: float) -> None:
    """On stderr, while the tables wait for the end."""
    print(f"scenario {name}: {time.perf_counter() - started_s:.0f} s", file=sys.stderr)  # noqa: T201


# Output


class Stdout:
    """What `tests.summary.write_table` writes to, outside pytest."""

    def section(self, title: str) -> None:
        print(f"\n{title}")  # noqa: T201 - a benchmark's job is to print its numbers

    def write_line(self, line: str) -> None:
        print(line)  # noqa: T201


def report(sections: list[Section], options: Options, elapsed_s: float) -> None:
    out = Stdout()
    for section in sections:
        write_table(out, section.title, section.header, section.rows, "\n".join(section.notes))
    out.write_line(f"\n{describe(options)}; {elapsed_s:.0f} s in all")


def describe(options: Options) -> str:
    where = "this process" if options.inline_emulators else "child processes"
    s = options.sizes
    return (
        f"sizes: {s.mix_tasks} mixed tasks, batches of {s.batch}, {s.singles} singles "
        f"(scenario 5); emulators in {where}; scenario 1 also published as bulk (fair): "
        f"{'yes' if options.bulk else 'no'}; policies {', '.join(map(str, POLICIES))}"
    )


def write_json(path: Path, sections: list[Section], options: Options) -> None:
    document = {
        "sizes": asdict(options.sizes),
        "styles_toml": styles_toml(),
        "sections": [
            {"title": s.title, "header": s.header, "rows": s.rows, "notes": s.notes, "runs": s.data}
            for s in sections
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))


async def main(options: Options) -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-scheduling-") as folder:
        files = {"photo.jpg": rig.photo(BURST_PHOTO)}
        async with rig.photo_host(files) as base_url:
            rig_ = Rig(
                options.amqp_url,
                f"{base_url}/photo.jpg",
                workflows(Path(folder) / "workflows"),
                Path(folder) / "outputs",
                options.inline_emulators,
            )
            sections = await scenarios(options, rig_)
    report(sections, options, time.perf_counter() - started)
    if options.json_path is not None:
        write_json(options.json_path, sections, options)
        print(f"JSON: {options.json_path}")  # noqa: T201


def parse(argv: list[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--amqp-url", default=rig.DEFAULT_AMQP_URL)
    parser.add_argument("--scenario", type=int, action="append", choices=range(1, 6))
    parser.add_argument("--quick", action="store_true", help="smaller workloads")
    parser.add_argument("--no-bulk", action="store_true", help="scenario 1: skip the bulk runs")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument("--inline-emulators", action="store_true")
    args = parser.parse_args(argv)
    return Options(
        amqp_url=args.amqp_url,
        scenarios=frozenset(args.scenario or range(1, 6)),
        sizes=QUICK if args.quick else Sizes(),
        bulk=not args.no_bulk,
        json_path=args.json,
        inline_emulators=args.inline_emulators,
    )


if __name__ == "__main__":
    asyncio.run(main(parse()))
