"""OTEL_* settings switch the SDK on: spans reach an OTLP/HTTP collector (a fake on loopback)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from tests.e2e.harness import publish, request, running_service

pytestmark = pytest.mark.connected

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@asynccontextmanager
async def collector() -> AsyncIterator[tuple[str, list[ExportTraceServiceRequest]]]:
    """An OTLP/HTTP traces endpoint on loopback; yields its base URL and what it received."""
    received: list[ExportTraceServiceRequest] = []

    async def traces(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        received.append(ExportTraceServiceRequest.FromString(await request.read()))
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", traces)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}", received
    finally:
        await runner.cleanup()


async def test_an_otlp_endpoint_setting_exports_the_tasks_spans(
    make_settings, channel, topology, events, photos
):
    """OTEL_EXPORTER_OTLP_ENDPOINT alone turns tracing on: by the end of the shutdown (which
    flushes), the collector has the task's spans, in the request's trace, named by service."""
    async with collector() as (url, received):
        settings = make_settings(otel_exporter_otlp_endpoint=url, otel_service_name="sc-test")
        assert settings.traces_exporters() == {"otlp"}
        async with running_service(settings):
            body = request(photos.url("photos/photo.jpg"))
            headers = {"traceparent": TRACEPARENT}
            await publish(channel, topology, "transform", body, headers=headers)
            assert (await events.terminal(body["task_id"]))["event"] == "completed"
    spans = [
        (resource_spans.resource, span)
        for export in received
        for resource_spans in export.resource_spans
        for scope_spans in resource_spans.scope_spans
        for span in scope_spans.spans
    ]
    in_trace = {span.name for _, span in spans if span.trace_id.hex() == TRACE_ID}
    assert {"process transform", "task", "download", "execute", "upload"} <= in_trace
    resource, _ = spans[0]
    names = {a.key: a.value.string_value for a in resource.attributes}
    assert names["service.name"] == "sc-test"
    assert names["service.instance.id"].startswith("style-consumer-")
