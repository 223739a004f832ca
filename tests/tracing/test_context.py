"""consumer.tracing without a broker: header extraction and injection, spans, logs, settings."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import Tracer as SdkTracer
from opentelemetry.trace import NoOpTracer, StatusCode

from consumer import tracing
from consumer.errors import ImageInvalid
from consumer.logs import TraceIds
from consumer.settings import SettingsError, load_settings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"


def extracted(headers: dict[str, Any] | None) -> trace.SpanContext:
    return trace.get_current_span(tracing.extract(headers)).get_span_context()


@pytest.mark.parametrize(
    "value", [TRACEPARENT, TRACEPARENT.encode(), bytearray(TRACEPARENT.encode())]
)
def test_a_valid_traceparent_is_read_from_text_or_bytes(value):
    """A W3C traceparent is accepted as an AMQP long string or byte array."""
    context = extracted({"traceparent": value})
    assert context.is_valid
    assert context.is_remote
    assert f"{context.trace_id:032x}" == TRACE_ID
    assert f"{context.span_id:016x}" == PARENT_ID


@pytest.mark.parametrize(
    "value",
    [
        "garbage",
        "",
        f"00-{'0' * 32}-{PARENT_ID}-01",
        f"00-{TRACE_ID}-{'0' * 16}-01",
        f"ff-{TRACE_ID}-{PARENT_ID}-01",
        f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
        TRACEPARENT + " " * 600,  # over 512 characters
        TRACEPARENT.encode() + b" " * 600,
        "\ud800" + TRACEPARENT,  # a lone surrogate
        b"\xff" + TRACEPARENT.encode(),
        42,
        4.2,
        True,
        None,
        ["a"],
        {"traceparent": TRACEPARENT},
    ],
)
def test_a_malformed_traceparent_reads_as_none(value):
    """Invalid ids, wrong types, oversized or undecodable values: no parent, no exception."""
    assert not extracted({"traceparent": value}).is_valid


def test_missing_headers_read_as_no_context():
    """A message without headers (None or empty) starts a new trace."""
    assert not extracted(None).is_valid
    assert not extracted({}).is_valid


header_values = st.one_of(
    st.text(max_size=600),
    st.binary(max_size=600),
    st.integers(),
    st.floats(allow_nan=True),
    st.none(),
    st.booleans(),
    st.lists(st.text(max_size=5), max_size=3),
    st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
)


SHARED_CPU = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # CI's CPU


@SHARED_CPU
@given(st.dictionaries(st.sampled_from(["traceparent", "tracestate", "other"]), header_values))
def test_extract_never_raises(headers):
    """Whatever the headers hold, extraction returns a context (valid or not)."""
    tracing.extract(headers)


@SHARED_CPU
@given(st.text(max_size=2000))
def test_any_tracestate_keeps_a_valid_traceparent(state):
    """A tracestate is kept when valid and dropped when not; the traceparent stands."""
    context = extracted({"traceparent": TRACEPARENT, "tracestate": state})
    assert context.is_valid
    assert len(context.trace_state.to_header()) <= tracing.MAX_HEADER_CHARS


def test_inject_writes_the_current_context_and_replaces_a_copied_one():
    """Injected headers name the current span; a sender's copied traceparent is replaced,
    and removed when there is no current span."""
    copied = {"traceparent": "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-01", "x": 1}
    assert tracing.inject(dict(copied)) == {"x": 1}
    context = tracing.extract({"traceparent": TRACEPARENT, "tracestate": "a=b"})
    with trace.use_span(trace.get_current_span(context)):
        headers = tracing.inject(dict(copied))
    assert headers == {"x": 1, "traceparent": TRACEPARENT, "tracestate": "a=b"}


def test_the_noop_tracer_passes_a_requests_context_through():
    """Tracing off: no span of ours, but events name the request's own trace context."""
    context = tracing.extract({"traceparent": TRACEPARENT})
    with tracing.NO_TRACER.start_as_current_span("process transform", context=context):
        assert tracing.inject({})["traceparent"] == TRACEPARENT
        assert tracing.log_ids() == {"trace_id": TRACE_ID, "span_id": PARENT_ID}
    assert tracing.inject({}) == {}
    assert tracing.log_ids() == {}


class _Job:
    """The few Job fields spans read."""

    accepted_at = 0.0

    def log_fields(self) -> dict[str, Any]:
        return {"task_id": "t-1", "user_id": "u", "instance": None, "attempt": 2}


def test_a_failing_stage_span_records_the_error_code_not_the_message(tracer_provider, span_log):
    """A ConsumerError marks its stage ERROR with its code; its message is not recorded."""
    tracer = tracer_provider.get_tracer("test")
    with pytest.raises(ImageInvalid), tracing.stage_span(tracer, "normalise", _Job()):
        raise ImageInvalid("http://photos.example/secret.jpg is not an image")
    (span,) = span_log.get_finished_spans()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == "image_invalid"
    assert dict(span.attributes or {}) == {
        "task_id": "t-1",
        "attempt": 2,
        "error.type": "image_invalid",
        "exception.type": "ImageInvalid",
    }
    assert not span.events


def test_a_cancelled_stage_is_not_an_error(tracer_provider, span_log):
    """Cancellation (shutdown, the owner's cancel) leaves the span's status unset."""
    tracer = tracer_provider.get_tracer("test")
    with pytest.raises(asyncio.CancelledError), tracing.stage_span(tracer, "execute", _Job()):
        raise asyncio.CancelledError
    (span,) = span_log.get_finished_spans()
    assert span.status.status_code is StatusCode.UNSET
    assert span.attributes["exception.type"] == "CancelledError"


def test_log_records_get_the_ids_of_the_current_span(tracer_provider):
    """The TraceIds filter stamps records logged inside a span, and only those."""
    ids = TraceIds()
    outside = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    inside = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
    ids.filter(outside)
    with tracer_provider.get_tracer("test").start_as_current_span("s") as span:
        ids.filter(inside)
    assert not hasattr(outside, "trace")
    assert inside.trace == {
        "trace_id": f"{span.get_span_context().trace_id:032x}",
        "span_id": f"{span.get_span_context().span_id:016x}",
    }


@pytest.mark.parametrize(
    ("values", "exporters"),
    [
        ({}, set()),
        ({"otel_exporter_otlp_endpoint": "http://collector:4318"}, {"otlp"}),
        ({"otel_exporter_otlp_traces_endpoint": "https://c/v1/traces"}, {"otlp"}),
        ({"otel_traces_exporter": "otlp"}, {"otlp"}),
        ({"otel_traces_exporter": "otlp,console"}, {"otlp", "console"}),
        ({"otel_traces_exporter": "none", "otel_exporter_otlp_endpoint": "http://c"}, set()),
        ({"otel_sdk_disabled": True, "otel_traces_exporter": "otlp"}, set()),
    ],
)
def test_settings_decide_where_spans_go(values, exporters):
    """Tracing is on only when OTEL_TRACES_EXPORTER names an exporter or an OTLP endpoint is
    set (the specification's default `otlp` would cost a running service for nothing)."""
    assert load_settings(**values).traces_exporters() == exporters


def test_settings_read_the_standard_variables(monkeypatch):
    """The OTEL_* names are the standard ones, read from the environment by Settings."""
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "console")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4318/")
    monkeypatch.setenv("OTEL_SERVICE_NAME", "styles-eu")
    settings = load_settings()
    assert settings.traces_exporters() == {"console"}
    assert settings.otlp_traces_url() == "http://collector:4318/v1/traces"
    assert settings.otel_service_name == "styles-eu"


@pytest.mark.parametrize(
    ("values", "names"),
    [
        ({"otel_traces_exporter": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"otel_exporter_otlp_endpoint": "collector:4318"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"otel_traces_exporter": "otlp", "otel_exporter_otlp_protocol": "grpc"}, "grpc"),
    ],
)
def test_settings_refuse_what_cannot_be_exported(values, names):
    """An unknown exporter, a URL without scheme, or OTLP over gRPC: refused at start-up."""
    with pytest.raises(SettingsError, match=names):
        load_settings(**values)


async def test_open_tracer_is_the_noop_tracer_unless_asked():
    """Without OTEL_* the API's no-op tracer runs; with an exporter, the SDK's."""
    async with tracing.open_tracer(load_settings(), "replica") as tracer:
        assert isinstance(tracer, NoOpTracer)
    settings = load_settings(otel_traces_exporter="console")
    async with tracing.open_tracer(settings, "replica") as tracer:
        assert isinstance(tracer, SdkTracer)
