"""Fixtures for tracing tests: a fresh SDK TracerProvider per test recording into a SpanLog,
plus the end-to-end fixtures (emulated ComfyUI, photo host, broker channel, event log)."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExportResult
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from consumer.logs import configure_logging
from tests.e2e.conftest import (  # noqa: F401 - fixtures, shared with the e2e tests
    channel,
    emulators,
    events,
    make_settings,
    photos,
    settings,
    topology,
)
from tests.e2e.harness import WAIT_S


class SpanLog(InMemorySpanExporter):
    """The SDK's in-memory exporter, plus a way to wait for a span to end."""

    def __init__(self) -> None:
        super().__init__()
        self._loop: asyncio.AbstractEventLoop | None = None  # the waiter's
        self._changed = asyncio.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        result = super().export(spans)
        if self._loop is not None:  # spans may end on another thread than the waiter's
            self._loop.call_soon_threadsafe(self._notify)
        return result

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def wait_for(
        self, predicate: Callable[[ReadableSpan], bool], timeout_s: float = WAIT_S
    ) -> ReadableSpan:
        """The first ended span matching `predicate`, waiting for it if needed."""
        self._loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout_s):
            while True:
                changed = self._changed
                for span in self.get_finished_spans():
                    if predicate(span):
                        return span
                await changed.wait()

    def of_trace(self, trace_id: int) -> list[ReadableSpan]:
        return [s for s in self.get_finished_spans() if s.context.trace_id == trace_id]


@pytest.fixture
def span_log() -> Iterator[SpanLog]:
    log = SpanLog()
    yield log
    log.clear()


@pytest.fixture
def tracer_provider(span_log: SpanLog) -> Iterator[TracerProvider]:
    """A provider of this test's own (no global is touched), exporting each span as it ends."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(span_log))
    yield provider
    provider.shutdown()


@pytest.fixture
def json_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """The service's own log set-up (`configure_logging`), writing to a buffer."""
    root = logging.getLogger()
    loggers = [logging.getLogger(name) for name in ("aiormq", "aio_pika")]
    saved: list[Any] = [root.handlers[:], root.level, [lg.level for lg in loggers]]
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    configure_logging("INFO", debug=False)
    yield stream
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for logger, level in zip(loggers, saved[2], strict=True):
        logger.setLevel(level)
