"""The JSON Schema files: fresh, valid draft-07, and in agreement with the models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft7Validator

from contracts import InvalidMessage, decode_request
from contracts.generate import SCHEMA_DIR, main, render_all

REQUEST_SCHEMAS = {
    "transform": "transform_request.json",
    "transform.batch": "batch_transform_request.json",
    "cancel": "cancel_request.json",
}


def validator(name: str) -> Draft7Validator:
    return Draft7Validator(json.loads((SCHEMA_DIR / name).read_text("utf-8")))


def test_committed_schemas_are_fresh():
    """The committed files equal what the models generate (run `make schemas` if not)."""
    for name, text in render_all().items():
        assert (SCHEMA_DIR / name).read_text("utf-8") == text, f"{name} is stale"


def test_generation_is_deterministic():
    """Two renders give the same sorted, newline-terminated text."""
    first, second = render_all(), render_all()
    assert first == second
    for text in first.values():
        assert text.endswith("}\n")
        assert json.loads(text)["$schema"] == "http://json-schema.org/draft-07/schema#"


def test_check_flag_reports_stale_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    """`--check` fails on a missing or edited file and passes after generating."""
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    assert main(["--dir", str(tmp_path)]) == 0
    assert main(["--check", "--dir", str(tmp_path)]) == 0
    (tmp_path / "cancel_request.json").write_text("{}\n", "utf-8")
    assert main(["--check", "--dir", str(tmp_path)]) == 1
    assert "stale: " in capsys.readouterr().err


@pytest.mark.parametrize("name", sorted(render_all()))
def test_schema_files_are_valid_draft7(name):
    """Each file is a valid draft-07 schema whose own examples validate."""
    schema = json.loads((SCHEMA_DIR / name).read_text("utf-8"))
    Draft7Validator.check_schema(schema)
    for example in schema["examples"]:
        Draft7Validator(schema).validate(example)


def test_error_codes_are_documented():
    """Every error code appears with its meaning in the task event schema."""
    text = (SCHEMA_DIR / "task_event.json").read_text("utf-8")
    for code in ("invalid_request", "comfyui_execution_error", "output_upload_failed"):
        assert f"- `{code}`: " in text


BASE: dict[str, Any] = {"user_id": "u1", "image_url": "https://a.example/p.png", "style_type": "s"}
AGREEMENT_CASES = [
    ("transform", BASE, True),
    ("transform", BASE | {"task_id": None, "seed": None, "schema_version": 1}, True),
    ("transform", BASE | {"strength": 1, "seed": 2**64 - 1}, True),
    ("transform", BASE | {"strength": 0}, False),
    ("transform", BASE | {"strength": "0.5"}, False),
    ("transform", BASE | {"seed": 2**64}, False),
    ("transform", BASE | {"seed": -1}, False),
    ("transform", BASE | {"seed": 1.5}, False),
    ("transform", BASE | {"image_url": "HTTP://a/b"}, False),
    ("transform", BASE | {"image_url": "https://a/b c"}, False),
    ("transform", BASE | {"image_url": "mailto:x@y"}, False),
    ("transform", BASE | {"task_id": "a/b"}, False),
    ("transform", BASE | {"user_id": "a.b"}, False),
    ("transform", BASE | {"style_type": "S"}, False),
    ("transform", BASE | {"schema_version": 2}, False),
    ("transform", BASE | {"output": {}}, False),
    ("transform", BASE | {"output": {"upload_url": "https://s/x?sig=1"}}, True),
    ("transform", BASE | {"metadata": {"a": [1, None, {"b": True}]}}, True),
    ("transform", BASE | {"metadata": "text"}, False),
    ("transform", BASE | {"unknown": 1}, False),
    ("transform", {"user_id": "u1", "style_type": "s"}, False),
    ("transform.batch", {"user_id": "u", "style_type": "s", "image_urls": ["http://a/b"]}, True),
    ("transform.batch", {"user_id": "u", "style_type": "s", "image_urls": []}, False),
    ("transform.batch", {"user_id": "u", "style_type": "s", "image_urls": [1]}, False),
    (
        "transform.batch",
        {"user_id": "u", "style_type": "s", "image_urls": ["http://a/"] * 51},
        False,
    ),
    (
        "transform.batch",
        {"user_id": "u", "style_type": "s", "image_urls": ["http://a/"], "batch_id": "b" * 61},
        False,
    ),
    ("cancel", {"user_id": "u", "task_id": "t"}, True),
    ("cancel", {"user_id": "u", "batch_id": "b", "task_id": None}, True),
    ("cancel", {"user_id": "u", "batch_id": "b", "task_id": "t"}, False),
    ("cancel", {"user_id": "u"}, False),
    ("cancel", {"user_id": "u", "task_id": None, "batch_id": None}, False),
    ("cancel", {"task_id": "t"}, False),
]


@pytest.mark.parametrize(("routing_key", "document", "valid"), AGREEMENT_CASES)
def test_schema_and_model_agree(routing_key, document, valid):
    """The JSON Schema and decode_request accept and refuse the same documents."""
    schema_ok = validator(REQUEST_SCHEMAS[routing_key]).is_valid(document)
    try:
        decode_request(routing_key, json.dumps(document).encode())
    except InvalidMessage:
        model_ok = False
    else:
        model_ok = True
    assert (schema_ok, model_ok) == (valid, valid)


HAND_WRITTEN_REQUEST = """
{
  "task_id": "go-client:7f3a",
  "user_id": "acct_981",
  "image_url": "https://cdn.example.org/uploads/2026/01/cat.webp?token=x9",
  "style_type": "oil_painting",
  "custom_prompt": "warm light, thick brush strokes \\u2014 like Van Gogh",
  "strength": 0.8,
  "seed": 18446744073709551615,
  "output": {"upload_url": "https://storage.example.org/b/out.png?X-Goog-Signature=ab"},
  "metadata": {"job": {"priority": 2, "tags": ["a", "b"]}, "trace": null},
  "schema_version": 1
}
"""


def test_hand_written_request_follows_the_schema():
    """A request typed as plain JSON from the schema alone validates both ways."""
    document = json.loads(HAND_WRITTEN_REQUEST)
    validator("transform_request.json").validate(document)
    request = decode_request("transform", HAND_WRITTEN_REQUEST.encode())
    assert request.model_dump(mode="json", exclude_none=True) == document


def test_hand_written_cancel_with_a_typo_is_refused_both_ways():
    """A misspelt field fails the schema and the model with the same culprit."""
    text = '{"user_id": "acct_981", "taskid": "go-client:7f3a"}'
    errors = [e.message for e in validator("cancel_request.json").iter_errors(json.loads(text))]
    assert any("'taskid' was unexpected" in message for message in errors)
    with pytest.raises(InvalidMessage, match="taskid: unknown field"):
        decode_request("cancel", text.encode())
