"""What tracing costs a task, off and on: `python -m tests.bench.tracing`.

Replays the calls one task makes into `consumer.tracing` (a delivery span, the task span,
five stage spans, two after-the-fact spans, eight events' headers, eight log lines' ids and
the outcome), in one event loop task as the service makes them, and prints microseconds per
task for: the API's no-op tracer (tracing off) with and without a `traceparent` in the
request, and the SDK recording every span (tracing on; each span goes to an exporter that
drops it, so the figure is the service's side: the batch processor's thread and the network
come on top).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Tracer

from consumer import tracing
from consumer.comfy.scheduling import Priority

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
STAGES = ("download", "normalise", "execute", "comfyui.upload", "upload")
EVENTS = 8  # accepted, started, 5 progress, completed
LOG_LINES = 8
TRACE = {"traceparent": TRACEPARENT, "tracestate": "app=t61rcWkgMzE"}


@dataclass
class Message:
    """What `delivery_span` reads of a delivery."""

    headers: dict[str, Any] = field(default_factory=dict)


@dataclass
class FakeJob:
    """What the spans read of a Job."""

    accepted_at: float = field(default_factory=time.monotonic)
    priority: Priority = Priority.INTERACTIVE

    def log_fields(self) -> dict[str, Any]:
        return {
            "task_id": "bench-0123456789",
            "user_id": "user_1",
            "style_type": "clay",
            "style_version": "3",
            "instance": "comfy-0",
            "attempt": 1,
        }


class Dropped(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:  # noqa: ARG002
        return SpanExportResult.SUCCESS


def one_task(tracer: Tracer, message: Any) -> None:
    job: Any = FakeJob()
    with tracing.delivery_span(tracer, message, "transform"):
        tracing.inject({"event": "accepted", "task_id": "t"})
        with tracing.task_span(tracer, job):
            tracing.past_span(tracer, "queued", job, tracing.wall_ns(job.accepted_at), None)
            for stage in STAGES:
                with tracing.stage_span(tracer, stage, job):
                    pass
            tracing.past_span(tracer, "comfyui.queue", job, time.time_ns(), None)
            for _ in range(EVENTS - 1):
                tracing.inject({"event": "progress", "task_id": "t"})
            for _ in range(LOG_LINES):
                tracing.log_ids()
            tracing.mark_outcome("completed", "ack", None)


async def per_task_us(tracer: Tracer, message: Any, tasks: int) -> float:
    """Best of five runs of `tasks` tasks, in microseconds per task."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(tasks):
            one_task(tracer, message)
        best = min(best, time.perf_counter() - started)
        await asyncio.sleep(0)
    return best / tasks * 1e6


async def main(tasks: int) -> None:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(Dropped()))  # no queue to overflow
    rows = [
        ("off: no-op tracer, no traceparent", tracing.NO_TRACER, Message()),
        ("off: no-op tracer, with traceparent", tracing.NO_TRACER, Message(TRACE)),
        ("on: SDK, every span recorded", provider.get_tracer("bench"), Message(TRACE)),
    ]
    print(f"tracing calls of one task ({tasks} tasks, best of 5), microseconds per task")  # noqa: T201
    for name, tracer, message in rows:
        print(f"  {name:<40} {await per_task_us(tracer, message, tasks):8.1f}")  # noqa: T201
    provider.shutdown()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tasks", type=int, default=5000)
    asyncio.run(main(parser.parse_args().tasks))
