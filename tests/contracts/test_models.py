"""Request and event models: what they accept, what they refuse, and how they say so."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from contracts import examples
from contracts.enums import ErrorCode, EventKind, TaskStatus
from contracts.models import (
    EVENT_RULES,
    BatchCompletedEvent,
    BatchTransformRequest,
    CancelRequest,
    TaskError,
    TaskEvent,
    TransformRequest,
)

MINIMAL: dict[str, Any] = {
    "user_id": "user-42",
    "image_url": "https://img.example.com/a.jpg",
    "style_type": "anime",
}
CREATED = datetime(2026, 1, 15, 9, 30, tzinfo=UTC)


def transform(**changes: Any) -> TransformRequest:
    return TransformRequest.model_validate(MINIMAL | changes)


def refused(model: Any, document: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as info:
        model.model_validate(document)
    return str(info.value)


def test_minimal_transform_request_has_defaults():
    """Only user_id, image_url and style_type are required."""
    request = transform()
    assert request.task_id is None
    assert request.strength is None
    assert request.schema_version is None


@pytest.mark.parametrize("document", examples.TRANSFORM_REQUEST)
def test_transform_examples_validate(document):
    """The published examples are valid requests."""
    assert TransformRequest.model_validate(document).user_id == "user-42"


@pytest.mark.parametrize(
    ("changes", "text"),
    [
        ({"strength": 0}, "greater than 0"),
        ({"strength": 1.5}, "less than or equal to 1"),
        ({"strength": "0.5"}, "valid number"),
        ({"strength": True}, "valid number"),
        ({"seed": -1}, "greater than or equal to 0"),
        ({"seed": 2**64}, "less than or equal to 18446744073709551615"),
        ({"seed": 1.0}, "valid integer"),
        ({"image_url": "ftp://x/y"}, "should match pattern"),
        ({"image_url": "http://:80/x"}, "the URL has no host"),
        ({"image_url": "http://[::1/x"}, "not a valid URL"),
        ({"image_url": "https://a/" + "x" * 2048}, "at most 2048 characters"),
        ({"custom_prompt": "x" * 2001}, "at most 2000 characters"),
        ({"negative_prompt": "x" * 2001}, "at most 2000 characters"),
        ({"task_id": "a b"}, "should match pattern"),
        ({"task_id": "t" * 65}, "at most 64 characters"),
        ({"user_id": "user.42"}, "should match pattern"),
        ({"style_type": "Anime"}, "should match pattern"),
        ({"schema_version": 2}, "Input should be 1"),
        ({"output": {"upload_url": "https://s3/x", "method": "POST"}}, "output.method"),
        ({"metadata": {"blob": "x" * 4096}}, "over the limit of 4096"),
        ({"metadata": []}, "valid dictionary"),
        ({"colour": "blue"}, "Extra inputs are not permitted"),
    ],
)
def test_transform_request_refuses_bad_values(changes, text):
    """Each out-of-contract value is refused with a message naming the problem."""
    assert text in refused(TransformRequest, MINIMAL | changes)


def test_missing_fields_are_named():
    """A request without its required fields names each of them."""
    text = refused(TransformRequest, {})
    for name in ("user_id", "image_url", "style_type"):
        assert f"{name}\n  Field required" in text


def test_metadata_limit_counts_compact_utf8_bytes():
    """Metadata of exactly 4096 bytes as compact UTF-8 JSON is accepted."""
    overhead = len(json.dumps({"k": ""}, separators=(",", ":")))
    text = "é" * ((4096 - overhead) // 2)
    assert transform(metadata={"k": text}).metadata == {"k": text}


def test_null_optional_fields_count_as_absent():
    """Clients that write null for unset optional fields are accepted."""
    request = transform(task_id=None, seed=None, output=None, metadata=None)
    assert request.model_dump(exclude_none=True) == MINIMAL


def test_batch_request_bounds_its_images():
    """A batch has 1 to 50 image URLs, each a valid http(s) URL."""
    batch = {"user_id": "u", "style_type": "anime"}
    urls = ["https://img.example.com/a.jpg"]
    assert len(BatchTransformRequest.model_validate(batch | {"image_urls": urls * 50}).image_urls)
    assert "at least 1 item" in refused(BatchTransformRequest, batch | {"image_urls": []})
    assert "at most 50 items" in refused(BatchTransformRequest, batch | {"image_urls": urls * 51})
    assert "image_urls.1" in refused(BatchTransformRequest, batch | {"image_urls": [*urls, "x"]})


def test_batch_id_leaves_room_for_the_index():
    """batch_id is at most 60 characters."""
    batch = {"user_id": "u", "style_type": "anime", "image_urls": ["http://a/b"]}
    assert "at most 60 characters" in refused(BatchTransformRequest, batch | {"batch_id": "b" * 61})


def test_batch_request_has_no_output_target():
    """Presigned outputs are per task, so a batch refuses `output`."""
    batch = {"user_id": "u", "style_type": "a", "image_urls": ["http://a/b"]}
    assert "Extra inputs" in refused(BatchTransformRequest, batch | {"output": {}})


@pytest.mark.parametrize(
    "document",
    [{"user_id": "u"}, {"user_id": "u", "task_id": "t", "batch_id": "b"}],
)
def test_cancel_needs_exactly_one_target(document):
    """A cancel names a task or a batch, never both nor neither."""
    assert "exactly one of task_id or batch_id" in refused(CancelRequest, document)


def test_cancel_with_null_other_target_is_accepted():
    """`batch_id: null` next to a task_id counts as absent."""
    cancel = CancelRequest.model_validate({"user_id": "u", "task_id": "t", "batch_id": None})
    assert cancel.task_id == "t"


def event(kind: EventKind, **changes: Any) -> TaskEvent:
    fields: dict[str, Any] = {
        "event": kind,
        "task_id": "t1",
        "user_id": "u1",
        "status": EVENT_RULES[kind].status,
        "progress": 0,
        "attempt": 1,
        "created_at": CREATED,
    }
    return TaskEvent(**fields | changes)


def test_event_gets_an_id_and_timestamp():
    """Each new event has a fresh event_id and an aware timestamp; schema_version is 1."""
    first, second = event(EventKind.ACCEPTED), event(EventKind.ACCEPTED)
    assert first.event_id != second.event_id
    assert first.timestamp.tzinfo is not None
    assert first.schema_version == 1


def test_event_json_has_every_field():
    """Serialized events carry every field, null when unset, times in UTC with a Z."""
    document = json.loads(event(EventKind.ACCEPTED).model_dump_json())
    assert set(document) == set(TaskEvent.model_fields)
    assert document["error"] is None
    assert document["created_at"] == "2026-01-15T09:30:00Z"


@pytest.mark.parametrize(
    ("kind", "missing"),
    [
        (EventKind.STARTED, "instance"),
        (EventKind.FAILED, "error"),
        (EventKind.RETRYING, "error"),
        (EventKind.COMPLETED, "output_image_url, output_image_urls"),
    ],
)
def test_event_requires_the_fields_of_its_kind(kind, missing):
    """started names its instance, failed/retrying carry an error, completed its outputs."""
    with pytest.raises(ValidationError, match=f"a '{kind}' event needs {missing}"):
        event(kind)


def test_event_status_must_match_a_terminal_kind():
    """A completed event cannot say its task failed."""
    with pytest.raises(ValidationError, match="a 'completed' event has status 'completed'"):
        event(
            EventKind.COMPLETED,
            status=TaskStatus.FAILED,
            output_image_url="http://a/b.png",
            output_image_urls=["http://a/b.png"],
        )


def test_failed_event_round_trips_through_json():
    """A failed event parses back from its own JSON unchanged."""
    error = TaskError(code=ErrorCode.TIMEOUT, message="ran past 600 s", retriable=False)
    original = event(EventKind.FAILED, error=error)
    assert TaskEvent.model_validate_json(original.model_dump_json()) == original


def test_event_refuses_naive_times_and_bad_progress():
    """Timestamps need a time zone; progress stays within 0..100."""
    with pytest.raises(ValidationError, match="timezone"):
        event(EventKind.ACCEPTED, created_at=datetime(2026, 1, 1))  # noqa: DTZ001 - naive on purpose
    with pytest.raises(ValidationError, match="less than or equal to 100"):
        event(EventKind.PROGRESS, progress=101)


def test_batch_completed_counts_must_add_up():
    """completed + failed + cancelled equals the number of tasks."""
    fields: dict[str, Any] = {
        "batch_id": "b",
        "user_id": "u",
        "style_type": "anime",
        "task_ids": ["b-0", "b-1"],
        "completed": 1,
        "failed": 0,
        "cancelled": 0,
    }
    with pytest.raises(ValidationError, match="counts add up to 1, but there are 2 tasks"):
        BatchCompletedEvent(**fields)
    assert BatchCompletedEvent(**fields | {"failed": 1}).event == "batch.completed"


@pytest.mark.parametrize(
    ("model", "documents"),
    [
        (TaskEvent, examples.TASK_EVENT),
        (BatchCompletedEvent, examples.BATCH_COMPLETED_EVENT),
        (CancelRequest, examples.CANCEL_REQUEST),
        (BatchTransformRequest, examples.BATCH_TRANSFORM_REQUEST),
    ],
)
def test_model_examples_validate(model, documents):
    """Every example embedded in a model's schema is valid for that model."""
    for document in documents:
        model.model_validate_json(json.dumps(document))
