"""The compatibility policy holds: events are open to additions, requests stay strict."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml
from jsonschema import Draft7Validator
from pydantic import ValidationError

from contracts import InvalidMessage, decode_request, examples
from contracts.generate import SCHEMA_DIR
from contracts.models import ADDED_IN_MINOR_VERSIONS, TaskEvent

ASYNCAPI_PATH = SCHEMA_DIR.parent / "asyncapi.yaml"
COMPLETED: dict[str, Any] = examples.TASK_EVENT[1]


def event_schema() -> Draft7Validator:
    return Draft7Validator(json.loads((SCHEMA_DIR / "task_event.json").read_text("utf-8")))


def test_an_event_of_a_1_0_replica_is_still_valid() -> None:
    """Without the fields added in 1.x (a rolling upgrade), an event passes schema and model."""
    old = {k: v for k, v in COMPLETED.items() if k not in ADDED_IN_MINOR_VERSIONS}
    assert "style_version" not in old
    event_schema().validate(old)
    assert TaskEvent.model_validate(old).style_version is None


def test_an_event_of_a_newer_minor_is_read_without_its_new_fields() -> None:
    """Unknown event fields (a later 1.x) pass the schema and are ignored by the model."""
    newer = COMPLETED | {"gpu_model": "H200", "timings_ms": COMPLETED["timings_ms"] | {"x": 1}}
    event_schema().validate(newer)
    parsed = TaskEvent.model_validate(newer)
    assert "gpu_model" not in parsed.model_dump()
    assert parsed.style_version == COMPLETED["style_version"]


@pytest.mark.parametrize("version", ["ABCDEF012345", "v1", "0123456789ab-", ""])
def test_style_version_is_lowercase_hex(version: str) -> None:
    """A style version, when set, is 8 to 64 lowercase hex digits, in schema and model alike."""
    document = COMPLETED | {"style_version": version}
    assert not event_schema().is_valid(document)
    with pytest.raises(ValidationError, match="style_version"):
        TaskEvent.model_validate(document)


def test_requests_still_refuse_unknown_fields() -> None:
    """Requests stay strict under the policy: an unknown field is refused, not ignored."""
    body = {"user_id": "u1", "image_url": "https://a.example/p.png", "style_type": "clay"}
    with pytest.raises(InvalidMessage, match="style_version: unknown field"):
        decode_request("transform", json.dumps(body | {"style_version": "0" * 12}).encode())


def test_policy_and_changelog_are_published() -> None:
    """asyncapi.yaml states the policy and lists 1.1.0's additions (style_version, priority)."""
    info = yaml.safe_load(ASYNCAPI_PATH.read_text("utf-8"))["info"]
    assert info["version"] == "1.1.0"
    text = " ".join(info["description"].split())
    assert "## Compatibility policy" in info["description"]
    for phrase in ("Ignore fields you do not know", "A new MAJOR", "side by side"):
        assert phrase in text
    changelog = text.split("## Changelog", 1)[1]
    entry = changelog.split("**1.0.0.**", 1)[0]
    assert "**1.1.0.**" in entry
    assert "`style_version`" in entry
    assert "`priority`" in entry
