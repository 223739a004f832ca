"""decode_request: raw AMQP bodies in, models or one readable InvalidMessage out."""

from __future__ import annotations

import json

import pytest

from contracts import (
    BatchTransformRequest,
    CancelRequest,
    InvalidMessage,
    TaskEvent,
    TransformRequest,
    decode_event,
    decode_request,
)
from contracts import examples as ex
from contracts.decode import MAX_REPORTED_ERRORS, format_path

GOOD = (
    b'{"user_id": "user-42", "image_url": "https://img.example.com/a.jpg", "style_type": "anime"}'
)


def invalid(routing_key: str, body: bytes) -> InvalidMessage:
    with pytest.raises(InvalidMessage) as info:
        decode_request(routing_key, body)
    return info.value


@pytest.mark.parametrize(
    ("routing_key", "document", "model"),
    [
        ("transform", ex.TRANSFORM_REQUEST[1], TransformRequest),
        ("transform.batch", ex.BATCH_TRANSFORM_REQUEST[0], BatchTransformRequest),
        ("cancel", ex.CANCEL_REQUEST[0], CancelRequest),
    ],
)
def test_routing_key_selects_the_model(routing_key, document, model):
    """Each request routing key decodes into its own model."""
    assert type(decode_request(routing_key, json.dumps(document).encode())) is model


def test_unknown_routing_key_is_refused_with_the_user():
    """An unknown routing key lists the known ones and still recovers the sender."""
    error = invalid("transfrom", GOOD)
    assert error.message == (
        "unknown routing key 'transfrom' (expected one of: cancel, transform, "
        "transform.batch, transform.batch.bulk, transform.bulk)"
    )
    assert error.user_id == "user-42"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"\xff{}", "body is not UTF-8: byte 0 is invalid"),
        (b"", "body is not JSON: Expecting value at line 1 column 1"),
        (b'{"user_id": "u",}', "body is not JSON: "),
        (b'{"strength": NaN}', "body is not JSON: NaN is not a JSON number"),
        (b'{"a": 1, "a": 2}', "body is not JSON: duplicate key 'a'"),
        (b"[]", "body must be a JSON object, not an array"),
        (b'"text"', "body must be a JSON object, not a string"),
        (b"3", "body must be a JSON object, not a number"),
        (b"null", "body must be a JSON object, not null"),
    ],
)
def test_bodies_that_are_not_json_objects(body, message):
    """Bad UTF-8, bad JSON, NaN, duplicate keys and non-objects are refused plainly."""
    error = invalid("transform", body)
    assert error.message.startswith(message)
    assert "\n" not in error.message
    assert error.user_id is None


def test_validation_errors_name_every_field():
    """Each problem is reported as `path: what is wrong (got value)`."""
    body = json.dumps(
        {
            "user_id": "u 1",
            "image_url": "ftp://x",
            "style_type": "anime",
            "strength": True,
            "colour": "blue",
        }
    ).encode()
    error = invalid("transform", body)
    assert error.message == (
        "invalid transform request: "
        "user_id: must be 1-64 letters, digits, '_' or '-' (got \"u 1\"); "
        "strength: Input should be a valid number (got true); "
        'image_url: must be an http:// or https:// URL without spaces (got "ftp://x"); '
        "colour: unknown field"
    )
    assert error.user_id is None


def test_nested_paths_and_missing_fields():
    """List indexes and nested objects show in the path; missing fields say so."""
    body = json.dumps(
        {"user_id": "u1", "image_urls": ["http://a/b", "http://:1/"], "output": {}}
    ).encode()
    error = invalid("transform.batch", body)
    assert 'image_urls[1]: the URL has no host (got "http://:1/")' in error.message
    assert "style_type: required field is missing" in error.message
    assert "output: unknown field" in error.message
    assert error.user_id == "u1"


def test_whole_message_errors_and_long_inputs():
    """Model-level errors name the message; long inputs are shortened."""
    assert invalid("cancel", b'{"user_id": "u1"}').message == (
        "invalid cancel request: CancelRequest (whole message): "
        "give exactly one of task_id or batch_id"
    )
    body = json.dumps({"user_id": "u1", "task_id": "x" * 100}).encode()
    assert f'(got "{"x" * 56}...)' in invalid("cancel", body).message


def test_error_list_is_capped():
    """Past ten problems the summary says how many more there are."""
    document = {f"extra{i}": i for i in range(MAX_REPORTED_ERRORS + 5)}
    message = invalid("cancel", json.dumps(document | {"user_id": "u"}).encode()).message
    assert message.endswith("; extra9: unknown field; and 5 more")


def test_user_id_is_only_recovered_when_valid():
    """A user_id that is not a valid id (wrong type or pattern) is not trusted."""
    assert invalid("cancel", b'{"user_id": 42}').user_id is None
    assert invalid("cancel", b'{"user_id": "a.b"}').user_id is None


def test_body_size_limit():
    """With max_bytes, an oversized body is refused before parsing."""
    with pytest.raises(InvalidMessage, match=f"message is {len(GOOD)} bytes, over the limit of 10"):
        decode_request("transform", GOOD, max_bytes=10)
    assert decode_request("transform", GOOD, max_bytes=len(GOOD)).user_id == "user-42"


def test_format_path():
    """Paths read like code: dots for fields, brackets for indexes."""
    assert format_path(("image_urls", 2)) == "image_urls[2]"
    assert format_path(("output", "upload_url")) == "output.upload_url"
    assert format_path(()) == ""


def test_decode_event_picks_the_event_model():
    """Task events and batch completions decode from their JSON."""
    for document in ex.TASK_EVENT + ex.BATCH_COMPLETED_EVENT:
        decoded = decode_event(json.dumps(document).encode())
        assert decoded.event_id == document["event_id"]
    assert isinstance(decode_event(json.dumps(ex.TASK_EVENT[0]).encode()), TaskEvent)


def test_decode_event_refuses_bad_events():
    """An event that breaks its rules is an InvalidMessage naming the sender."""
    document = ex.TASK_EVENT[2] | {"error": None}
    with pytest.raises(InvalidMessage, match="a 'failed' event needs error") as info:
        decode_event(json.dumps(document).encode())
    assert info.value.user_id == "user-42"
