"""OpenTelemetry tracing: W3C trace context in AMQP headers, and the spans of a task.

    process <kind>        CONSUMER  one per delivery (intake); a child of the request's
    │                               `traceparent` when it carries a valid one, else a new trace
    └── task                        one run of a task (dispatcher): accepted -> settled
        ├── queued                  accepted -> a slot on an instance (the first attempt)
        ├── download, normalise     the pipeline's stages, as in `timings_ms`
        ├── execute                 one per attempt: the slot -> the outputs read back
        │   ├── comfyui.upload      the photo uploaded to the instance
        │   └── comfyui.queue       the prompt submitted -> started on the instance
        └── upload                  the result stored (OUTPUT_STORE, or the request's URL)

Every event, reply and request this service publishes carries the current context in
`traceparent`/`tracestate` (a dead letter keeps the original's), so a subscriber joins the
trace, and a batch's tasks are children of the batch's delivery. Span attributes have the
names of the log fields (`task_id`, `user_id`: the app's opaque id, `style_type`, `instance`,
`attempt`...); a failure sets `error.type` to the error code and the span's status to ERROR.
Error messages are never recorded (they may name the photo's URL).

Off, the API's no-op tracer runs: nothing is recorded or exported, and a request's valid
`traceparent` passes through to its events unchanged (the no-op tracer keeps the parent).
The SDK is imported only when Settings ask for an exporter (`Settings.traces_exporters`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterator, Mapping, MutableMapping
from contextlib import asynccontextmanager, contextmanager
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, Setter
from opentelemetry.trace import NoOpTracer, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from consumer import __version__
from consumer.errors import ConsumerError

if TYPE_CHECKING:
    from aio_pika.abc import AbstractIncomingMessage
    from opentelemetry.sdk.trace import TracerProvider as SdkTracerProvider
    from opentelemetry.trace import TracerProvider

    from consumer.jobs import Job
    from consumer.settings import Settings

log = logging.getLogger(__name__)
SCOPE = "style-consumer"  # the instrumentation scope of every span
NO_TRACER: Final[Tracer] = NoOpTracer()
MAX_HEADER_CHARS = 512  # W3C: a traceparent is 55 characters, a tracestate at most 512
TRACE_HEADERS = ("traceparent", "tracestate")
_PROPAGATOR = TraceContextTextMapPropagator()  # W3C trace context only: no baggage
_STAGE_FIELDS = ("task_id", "instance", "attempt")


class _HeaderGetter(Getter[Mapping[str, Any]]):
    """A trace header of AMQP headers: text or ASCII bytes of at most 512 characters. Anything
    else (a table, a number, a longer or undecodable value) reads as absent, unlogged."""

    def get(self, carrier: Mapping[str, Any], key: str) -> list[str] | None:
        value = carrier.get(key)
        if isinstance(value, bytes | bytearray) and len(value) <= MAX_HEADER_CHARS:
            value = value.decode("ascii", "replace")  # a replaced byte fails the W3C format
        if isinstance(value, str) and len(value) <= MAX_HEADER_CHARS:
            return [value]
        return None

    def keys(self, carrier: Mapping[str, Any]) -> list[str]:
        return [key for key in carrier if isinstance(key, str)]


class _HeaderSetter(Setter[MutableMapping[str, Any]]):
    def set(self, carrier: MutableMapping[str, Any], key: str, value: str) -> None:
        carrier[key] = value


_GETTER: Final = _HeaderGetter()
_SETTER: Final = _HeaderSetter()


def extract(headers: Mapping[str, Any] | None) -> Context:
    """The trace context `headers` carry; an empty one (a new trace) when none is valid."""
    if not headers:
        return Context()
    try:
        return _PROPAGATOR.extract(headers, getter=_GETTER)
    except Exception:  # hostile headers are ignored: never fatal, never echoed
        log.debug("trace context ignored: unreadable headers")
        return Context()


def inject(headers: dict[str, Any]) -> dict[str, Any]:
    """`headers` with the current trace context (replacing any copied from another message)."""
    for name in TRACE_HEADERS:
        headers.pop(name, None)
    _PROPAGATOR.inject(headers, setter=_SETTER)
    return headers


def log_ids() -> dict[str, str]:
    """`trace_id` and `span_id` of the current span, for log lines; empty outside a trace."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return {}
    return {"trace_id": f"{context.trace_id:032x}", "span_id": f"{context.span_id:016x}"}


@contextmanager
def delivery_span(tracer: Tracer, message: AbstractIncomingMessage, kind: str) -> Iterator[Span]:
    """Handling one delivery (`kind`: a bounded name of its routing key), in the sender's trace."""
    with tracer.start_as_current_span(
        f"process {kind}",
        context=extract(message.headers),
        kind=SpanKind.CONSUMER,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        if span.is_recording():
            span.set_attributes(
                {
                    "messaging.system": "rabbitmq",
                    "messaging.operation.type": "process",
                    "messaging.rabbitmq.destination.routing_key": kind,
                }
            )
        yield span


@contextmanager
def task_span(tracer: Tracer, job: Job) -> Iterator[Span]:
    """One run of a task: from its acceptance until its ending is settled."""
    with tracer.start_as_current_span(
        "task",
        start_time=wall_ns(job.accepted_at),
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        finally:
            if span.is_recording():  # instance and attempt as they ended
                span.set_attributes(_attributes(job.log_fields()))
                span.set_attribute("priority", job.priority.label)


@contextmanager
def stage_span(tracer: Tracer, name: str, job: Job) -> Iterator[None]:
    """A step of a task; a ConsumerError marks it failed, with its code."""
    with tracer.start_as_current_span(
        name, record_exception=False, set_status_on_exception=False
    ) as span:
        if span.is_recording():
            span.set_attributes(_stage_attributes(job))
        try:
            yield
        except ConsumerError as exc:
            _failed(span, exc.code.value, type(exc).__name__)
            raise
        except (Exception, asyncio.CancelledError) as exc:  # preempted, cancelled, or a bug:
            if span.is_recording():  # the task's outcome says which
                span.set_attribute("exception.type", type(exc).__name__)
            raise


def past_span(tracer: Tracer, name: str, job: Job, start_ns: int, end_ns: int | None) -> None:
    """A step measured after the fact, from `start_ns` to `end_ns` (None: now)."""
    span = tracer.start_span(name, start_time=start_ns)
    if span.is_recording():
        span.set_attributes(_stage_attributes(job))
    span.end(end_time=end_ns)


def mark_outcome(outcome: str, action: str, error_code: str | None) -> None:
    """How the current delivery or task ended; an error code marks the span failed."""
    span = trace.get_current_span()
    if not span.is_recording():
        return
    span.set_attributes({"outcome": outcome, "action": action})
    if error_code is not None:
        _failed(span, error_code, None)


def wall_ns(monotonic_s: float) -> int:
    """The wall-clock time (ns since the epoch, as spans have it) of a `time.monotonic()`."""
    return time.time_ns() - int((time.monotonic() - monotonic_s) * 1e9)


def _failed(span: Span, code: str, error_class: str | None) -> None:
    if not span.is_recording():
        return
    span.set_attribute("error.type", code)
    if error_class is not None:
        span.set_attribute("exception.type", error_class)
    span.set_status(Status(StatusCode.ERROR, code))


def _stage_attributes(job: Job) -> dict[str, str | int]:
    fields = job.log_fields()
    return _attributes({name: fields.get(name) for name in _STAGE_FIELDS})


def _attributes(fields: Mapping[str, Any]) -> dict[str, str | int]:
    """Log fields as span attributes: ints and text, None left out."""
    return {
        name: value if isinstance(value, int | str) else str(value)
        for name, value in fields.items()
        if value is not None
    }


@asynccontextmanager
async def open_tracer(
    settings: Settings, instance_id: str, provider: TracerProvider | None = None
) -> AsyncIterator[Tracer]:
    """The service's tracer: from `provider` (the caller's to shut down), else from the SDK
    when Settings name an exporter (shut down, i.e. flushed, at the end), else the no-op one."""
    if provider is not None:
        yield provider.get_tracer(SCOPE, __version__)
        return
    exporters = settings.traces_exporters()
    if not exporters:
        yield NO_TRACER
        return
    sdk = _sdk_provider(settings, exporters, instance_id)
    log.info("tracing on: spans go to %s", ", ".join(sorted(_targets(settings, exporters))))
    try:
        yield sdk.get_tracer(SCOPE, __version__)
    finally:
        await asyncio.to_thread(sdk.shutdown)  # the last export is blocking HTTP: off the loop


def _targets(settings: Settings, exporters: frozenset[str]) -> set[str]:
    """The exporters, OTLP's with its host (never the URL's credentials, if any)."""
    url = urlsplit(settings.otlp_traces_url())
    otlp = f"otlp {url.scheme}://{url.netloc.rpartition('@')[2]}{url.path}"
    return {otlp if name == "otlp" else name for name in exporters}


def _sdk_provider(
    settings: Settings, exporters: frozenset[str], instance_id: str
) -> SdkTracerProvider:
    """A TracerProvider exporting in batches, from a background thread (imported only now)."""
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider as SdkProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    resource = Resource.create(
        {
            "service.name": settings.otel_service_name,
            "service.version": __version__,
            "service.instance.id": instance_id,
        }
    )
    provider = SdkProvider(resource=resource)
    if "otlp" in exporters:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_traces_url())
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if "console" in exporters:
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    return provider
