"""A replica on the real broker, its spans recorded: trace context in, stage spans, context out."""

from __future__ import annotations

import re
from typing import Any

import orjson
import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import StatusCode

from tests.e2e.harness import EventLog, publish, request, running_service

pytestmark = pytest.mark.connected

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
TRACESTATE = "app=t61rcWkgMzE"
W3C = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
STAGES = {"queued", "download", "normalise", "execute", "upload"}


def headers_of(log: EventLog, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    """(event kind, AMQP headers) of every event published for `task_id`."""
    out = []
    for message in log.messages:
        event = orjson.loads(message.body)
        if event.get("task_id") == task_id:
            out.append((event["event"], dict(message.headers)))
    return out


def parent_of(headers: dict[str, Any]) -> tuple[int, int]:
    """(trace id, parent span id) of a `traceparent` we published."""
    match = W3C.fullmatch(headers["traceparent"])
    assert match is not None, headers["traceparent"]
    return int(match[1], 16), int(match[2], 16)


def named(spans: list[ReadableSpan], name: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name == name]


def task_span_of(task_id: str):
    return lambda s: s.name == "task" and s.attributes.get("task_id") == task_id


async def run_one(channel, topology, events, span_log, photos, **properties) -> tuple[str, Any]:
    """Publish one request, wait for its terminal event and its ended task span."""
    body = request(photos.url("photos/photo.jpg"))
    await publish(channel, topology, "transform", body, **properties)
    terminal = await events.terminal(body["task_id"])
    task = await span_log.wait_for(task_span_of(body["task_id"]))
    return body["task_id"], (terminal, task)


async def test_a_requests_trace_is_continued_through_its_stages_to_its_events(
    settings, tracer_provider, span_log, channel, topology, events, photos
):
    """traceparent -> process span -> task span -> stage spans; every event carries the trace,
    its parent one of our spans, and the tracestate goes along."""
    headers = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    async with running_service(settings, tracer_provider=tracer_provider):
        task_id, (terminal, task) = await run_one(
            channel, topology, events, span_log, photos, headers=headers
        )
    assert terminal["event"] == "completed"
    spans = span_log.of_trace(int(TRACE_ID, 16))
    (delivery,) = named(spans, "process transform")
    assert delivery.parent is not None
    assert delivery.parent.span_id == int(PARENT_ID, 16)
    assert delivery.parent.is_remote
    assert task.parent is not None
    assert task.parent.span_id == delivery.context.span_id
    stages = {s.name: s for s in spans if s.parent and s.parent.span_id == task.context.span_id}
    assert set(stages) >= STAGES
    for name in ("comfyui.upload", "comfyui.queue"):
        (span,) = named(spans, name)
        assert span.parent is not None
        assert span.parent.span_id == stages["execute"].context.span_id
    attributes = dict(task.attributes or {})
    assert attributes["task_id"] == task_id
    assert attributes["user_id"] == "user_1"
    assert attributes["style_type"] == "clay"
    assert attributes["instance"] in {"comfy-0", "comfy-1"}
    assert attributes["attempt"] == 1
    assert attributes["outcome"] == "completed"
    assert task.status.status_code is not StatusCode.ERROR

    ours = {s.context.span_id for s in spans}
    published = headers_of(events, task_id)
    assert {kind for kind, _ in published} >= {"accepted", "started", "completed"}
    for kind, event_headers in published:
        trace_id, parent_id = parent_of(event_headers)
        assert trace_id == int(TRACE_ID, 16), kind
        assert parent_id in ours, kind
        assert event_headers["tracestate"] == TRACESTATE
    by_kind = {kind: parent_of(h)[1] for kind, h in published}
    assert by_kind["accepted"] == delivery.context.span_id
    assert by_kind["started"] == stages["execute"].context.span_id
    assert by_kind["completed"] == task.context.span_id


async def test_without_a_traceparent_a_new_trace_starts_and_events_carry_it(
    settings, tracer_provider, span_log, channel, topology, events, photos
):
    """No trace context in: the process span is a root, and the events are in its trace."""
    async with running_service(settings, tracer_provider=tracer_provider):
        task_id, (_, task) = await run_one(channel, topology, events, span_log, photos)
    spans = span_log.of_trace(task.context.trace_id)
    (delivery,) = named(spans, "process transform")
    assert delivery.parent is None
    for kind, event_headers in headers_of(events, task_id):
        assert parent_of(event_headers)[0] == task.context.trace_id, kind
        assert "tracestate" not in event_headers


HOSTILE: list[dict[str, Any]] = [
    {"traceparent": "garbage"},
    {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"},  # an all-zero trace id is invalid
    {"traceparent": f"ff-{TRACE_ID}-{PARENT_ID}-01"},  # version ff is forbidden
    {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01-extra"},  # version 00 has 4 parts
    {"traceparent": "x" * 60_000},
    {"traceparent": bytearray(b"\xff\xfe" * 100)},  # an AMQP byte array
    {"traceparent": 42},
    {"traceparent": ["a", "list"]},
    {"traceparent": {"a": "table"}},
    {"traceparent": None},
    {"tracestate": "k=v"},  # a tracestate alone starts nothing
]


async def test_malformed_trace_context_is_ignored_and_the_task_completes(
    settings, tracer_provider, span_log, channel, topology, events, photos, caplog
):
    """Hostile traceparent values (wrong types, huge, bytes, invalid ids) are ignored: a new
    trace starts, the task completes, and nothing of them is echoed in events or logs."""
    async with running_service(settings, tracer_provider=tracer_provider):
        for headers in HOSTILE:
            _, (terminal, task) = await run_one(
                channel, topology, events, span_log, photos, headers=headers
            )
            assert terminal["event"] == "completed", headers
            (delivery,) = named(span_log.of_trace(task.context.trace_id), "process transform")
            assert delivery.parent is None, headers
            assert task.context.trace_id != int(TRACE_ID, 16)
    for message in events.messages:
        assert len(message.headers["traceparent"]) == 55
        assert "tracestate" not in message.headers
    assert all(len(record.getMessage()) < 2000 for record in caplog.records)


async def test_a_valid_traceparent_survives_a_hostile_tracestate_and_bytes(
    settings, tracer_provider, span_log, channel, topology, events, photos
):
    """A valid traceparent is continued even as bytes; an oversized tracestate is dropped."""
    cases = [
        {"traceparent": bytearray(TRACEPARENT.encode()), "tracestate": TRACESTATE},
        {"traceparent": TRACEPARENT, "tracestate": "y" * 60_000},
        {"traceparent": TRACEPARENT, "tracestate": "not a valid member"},
    ]
    async with running_service(settings, tracer_provider=tracer_provider):
        for headers in cases:
            task_id, (terminal, task) = await run_one(
                channel, topology, events, span_log, photos, headers=headers
            )
            assert terminal["event"] == "completed", headers
            assert task.context.trace_id == int(TRACE_ID, 16), headers
            states = {h.get("tracestate") for _, h in headers_of(events, task_id)}
            assert states == ({TRACESTATE} if headers is cases[0] else {None}), headers


async def test_task_log_lines_carry_the_trace_and_span_ids(
    settings, tracer_provider, span_log, channel, topology, events, photos, json_logs
):
    """Log lines about a task (JSON, as configured by the service) carry its trace_id and
    the span_id of one of its spans."""
    async with running_service(settings, tracer_provider=tracer_provider):
        task_id, _ = await run_one(
            channel, topology, events, span_log, photos, headers={"traceparent": TRACEPARENT}
        )
    lines = [orjson.loads(line) for line in json_logs.getvalue().splitlines() if line]
    about_task = [line for line in lines if line.get("task_id") == task_id]
    assert {line["msg"] for line in about_task} >= {"event accepted", "task completed"}
    ours = {f"{s.context.span_id:016x}" for s in span_log.of_trace(int(TRACE_ID, 16))}
    for line in about_task:
        assert line["trace_id"] == TRACE_ID, line
        assert line["span_id"] in ours, line
    assert not any("trace_id" in line for line in lines if line["msg"] == "ready")


@pytest.mark.parametrize("scheduler", ["fair", "fifo"])  # fed a slice at a time, or at once
async def test_a_batchs_tasks_are_children_of_the_batchs_trace(
    scheduler, make_settings, tracer_provider, span_log, channel, topology, events, photos
):
    """The tasks a batch request is expanded into are published with its trace context: each
    task's process span is a child of the batch's, and batch.completed is in the same trace."""
    settings = make_settings(scheduler=scheduler)
    body = {
        "batch_id": "b-traced",
        "user_id": "user_1",
        "style_type": "clay",
        "image_urls": [photos.url("photos/photo.jpg")] * 3,
    }
    async with running_service(settings, tracer_provider=tracer_provider):
        await publish(
            channel, topology, "transform.batch", body, headers={"traceparent": TRACEPARENT}
        )
        done_at = await events.wait_for(lambda e: e["event"] == "batch.completed")
        tasks = [await span_log.wait_for(task_span_of(f"b-traced-{index}")) for index in range(3)]
    assert done_at["batch_id"] == "b-traced"
    spans = span_log.of_trace(int(TRACE_ID, 16))
    (batch,) = named(spans, "process transform.batch")
    assert batch.parent is not None
    assert batch.parent.span_id == int(PARENT_ID, 16)
    by_id = {s.context.span_id: s for s in spans}
    for task in tasks:
        assert task.context.trace_id == int(TRACE_ID, 16)
        assert task.parent is not None
        delivery = by_id[task.parent.span_id]
        assert delivery.name.startswith("process transform")
        assert delivery.parent is not None
        assert delivery.parent.span_id == batch.context.span_id
    (completed,) = [m for m in events.messages if m.type == "batch.completed"]
    assert parent_of(dict(completed.headers))[0] == int(TRACE_ID, 16)


async def test_failures_mark_their_spans_with_the_error_code(
    settings, tracer_provider, span_log, channel, topology, events, photos
):
    """A task that fails marks its failing stage and its task span ERROR with the contract's
    code; a poison request marks its delivery's span so, and its failed event is in its trace."""
    headers = {"traceparent": TRACEPARENT}
    not_an_image = request(photos.url("photos/not-image.txt"))
    async with running_service(settings, tracer_provider=tracer_provider):
        await publish(channel, topology, "transform", not_an_image, headers=headers)
        assert (await events.terminal(not_an_image["task_id"]))["event"] == "failed"
        task = await span_log.wait_for(task_span_of(not_an_image["task_id"]))
        poison = {"task_id": "t-poison", "user_id": "user_1", "style_type": "clay"}
        await publish(channel, topology, "transform", poison, headers=headers)
        await events.terminal("t-poison")
        refused = await span_log.wait_for(
            lambda s: s.name == "process transform" and s.attributes.get("outcome") == "refused"
        )
    for span in (task, refused):
        assert span.status.status_code is StatusCode.ERROR
    assert task.attributes["error.type"] == task.status.description == "image_invalid"
    assert refused.attributes["error.type"] == "invalid_request"
    (normalise,) = [
        s
        for s in named(span_log.of_trace(int(TRACE_ID, 16)), "normalise")
        if s.parent and s.parent.span_id == task.context.span_id
    ]
    assert normalise.attributes["error.type"] == "image_invalid"
    (failed,) = [h for kind, h in headers_of(events, "t-poison") if kind == "failed"]
    assert parent_of(failed) == (int(TRACE_ID, 16), refused.context.span_id)
