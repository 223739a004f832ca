"""contracts/asyncapi.yaml: well formed, every reference resolves, every example is valid."""

from __future__ import annotations

import json
import re
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from jsonschema import Draft7Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

from consumer.topology import Topology
from contracts import EventKind, InvalidMessage, decode_request
from contracts.decode import REQUEST_MODELS
from contracts.generate import SCHEMAS
from contracts.ids import batch_completed_routing_key, task_event_routing_key
from contracts.models import (
    BatchCompletedEvent,
    BatchTransformRequest,
    CancelRequest,
    TaskEvent,
    TransformRequest,
)

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts"
ASYNCAPI_PATH = CONTRACTS_DIR / "asyncapi.yaml"
ASYNCAPI_URI = ASYNCAPI_PATH.as_uri()
MESSAGE_MODELS: dict[str, Any] = {
    "TransformRequest": TransformRequest,
    "BatchTransformRequest": BatchTransformRequest,
    "CancelRequest": CancelRequest,
    "TaskEvent": TaskEvent,
    "BatchCompletedEvent": BatchCompletedEvent,
}
TOPOLOGY = {
    "style.requests",
    "style.transform",
    "style.transform.bulk",
    "style.control",
    "style.events",
    "style.unrouted",
    "style.dlx",
    "style.dead",
}


def document() -> dict[str, Any]:
    loaded = load_file(ASYNCAPI_PATH)
    assert isinstance(loaded, dict)
    return loaded


def walk(node: Any, path: str = "") -> list[tuple[str, Any]]:
    """Every (json-path, value) pair under node."""
    pairs = [(path, node)]
    children = (
        node.items()
        if isinstance(node, dict)
        else enumerate(node)
        if isinstance(node, list)
        else []
    )
    for key, child in children:
        pairs += walk(child, f"{path}/{key}")
    return pairs


def pointer(target: Any, fragment: str) -> Any:
    """Follow a JSON pointer (RFC 6901) from target."""
    for token in filter(None, fragment.split("/")):
        key = unquote(token).replace("~1", "/").replace("~0", "~")
        target = target[int(key)] if isinstance(target, list) else target[key]
    return target


@cache
def load_file(path: Path) -> Any:
    """A parsed YAML or JSON file (cached: the tests only read it)."""
    text = path.read_text("utf-8")
    return yaml.safe_load(text) if path.suffix == ".yaml" else json.loads(text)


def resolve(ref: str, base: Path) -> tuple[Any, Path]:
    """The target of `ref` written in the file `base`, and the file it lies in."""
    file_part, _, fragment = ref.partition("#")
    path = (base.parent / file_part).resolve() if file_part else base
    return pointer(load_file(path), fragment), path


def refs_in(node: Any) -> list[tuple[str, str]]:
    return [
        (where, value["$ref"])
        for where, value in walk(node)
        if isinstance(value, dict) and "$ref" in value
    ]


def test_document_is_asyncapi_3_on_amqp():
    """The document declares AsyncAPI 3.0.0 and the local AMQP 0.9.1 server."""
    doc = document()
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"]
    assert doc["info"]["version"] == "1.1.0"
    assert doc["defaultContentType"] == "application/json"
    assert doc["servers"]["local"] == doc["servers"]["local"] | {
        "host": "localhost:5672",
        "protocol": "amqp",
        "protocolVersion": "0.9.1",
    }


def test_every_ref_resolves():
    """Local and file references resolve, including refs inside the referenced files."""
    pending = [(where, ref, ASYNCAPI_PATH) for where, ref in refs_in(document())]
    seen: set[tuple[str, Path]] = set()
    while pending:
        where, ref, base = pending.pop()
        try:
            target, path = resolve(ref, base)
        except (KeyError, IndexError, OSError) as exc:
            pytest.fail(f"{base.name}{where}: $ref {ref!r} does not resolve ({exc!r})")
        if (ref, path) not in seen and ref.partition("#")[0]:
            seen.add((ref, path))
            pending += [(w, r, path) for w, r in refs_in(load_file(path))]
        assert target is not None
    assert {path.name for _, path in seen} == {f"{name}.json" for name in SCHEMAS}


def test_every_exchange_and_queue_has_a_channel():
    """The whole topology is described, and request routing keys match decode_request."""
    channels = document()["channels"].values()
    bindings = [channel["bindings"]["amqp"] for channel in channels]
    names = {b.get("exchange", {}).get("name") for b in bindings}
    names |= {b.get("queue", {}).get("name") for b in bindings}
    assert names >= TOPOLOGY
    requests = {
        c["address"]
        for c in channels
        if c["bindings"]["amqp"].get("exchange", {}).get("name") == "style.requests"
    }
    assert requests == set(REQUEST_MODELS)


def test_bindings_are_amqp_0_3_0():
    """Every channel, operation and message binding is an AMQP 0.3.0 binding of the right shape."""
    doc = document()
    found = [value for where, value in walk(doc) if where.endswith("/bindings/amqp")]
    assert len(found) >= len(doc["channels"]) + len(doc["operations"])
    for binding in found:
        assert binding["bindingVersion"] == "0.3.0"
    for name, channel in doc["channels"].items():
        amqp = channel["bindings"]["amqp"]
        shape = "exchange" if amqp["is"] == "routingKey" else "queue"
        assert set(amqp) == {"is", shape, "bindingVersion"}, name


def test_queue_arguments_are_documented():
    """The work queue's quorum type, delivery limit and DLX are stated."""
    description = document()["channels"]["transformQueue"]["description"]
    for argument in (
        "x-queue-type: quorum",
        "x-delivery-limit: 5",
        "x-dead-letter-exchange: style.dlx",
    ):
        assert argument in description


def test_reliability_contract_is_described():
    """The info description states delivery, dedup, idempotency, ordering and DLQ rules."""
    text = " ".join(document()["info"]["description"].split())
    for phrase in (
        "At least once",
        "Deduplicate on `event_id`",
        "idempotency key",
        "no ordering across tasks",
        "`x-error-code`",
        "`x-error-message`",
    ):
        assert phrase in text


def test_event_channels_match_the_routing_key_builders():
    """Event channel addresses are what contracts.ids builds, with declared parameters."""
    channels = document()["channels"]
    assert channels["taskEvents"]["address"] == task_event_routing_key("{event}", "{user_id}")
    assert channels["batchEvents"]["address"] == batch_completed_routing_key("{user_id}")
    assert channels["taskEvents"]["parameters"]["event"]["enum"] == [
        kind.value for kind in EventKind
    ]
    for name, channel in channels.items():
        declared = set(channel.get("parameters", {}))
        assert set(re.findall(r"\{(\w+)\}", channel["address"] or "")) == declared, name


def test_operations_use_their_channels_messages():
    """Each operation (and reply) lists only messages of its own channel."""
    doc = document()
    for name, operation in doc["operations"].items():
        for part in (operation, operation.get("reply")):
            if part is None:
                continue
            channel_ref = part["channel"]["$ref"]
            for message in part["messages"]:
                assert message["$ref"].startswith(f"{channel_ref}/messages/"), name
                resolve(message["$ref"], ASYNCAPI_PATH)
    actions = {(op["action"], op["channel"]["$ref"]) for op in doc["operations"].values()}
    assert ("send", "#/channels/replyTo") in actions
    assert ("receive", "#/channels/transformQueue") in actions


@cache
def registry() -> Registry:
    def retrieve(uri: str) -> Resource:
        return Resource.from_contents(
            load_file(Path(unquote(urlsplit(uri).path))), default_specification=DRAFT7
        )

    return Registry(retrieve=retrieve)  # type: ignore[call-arg]


def schema_validator(schema: dict[str, Any]) -> Draft7Validator:
    """A validator for a schema written inside asyncapi.yaml (relative refs resolve)."""
    return Draft7Validator({"$id": ASYNCAPI_URI, "allOf": [schema]}, registry=registry())


def message_examples(names: object = None) -> list[Any]:
    """pytest params (message name, message, example) for every example of the named messages."""
    messages = document()["components"]["messages"]
    return [
        pytest.param(name, message, example, id=f"{name}-{example['name']}")
        for name, message in messages.items()
        if names is None or name in names  # type: ignore[operator]
        for example in message["examples"]
    ]


@pytest.mark.parametrize(("name", "message", "example"), message_examples())
def test_examples_validate_against_their_schemas(name, message, example):
    """Every message example's payload (and headers) validates against the referenced schema."""
    assert message["payload"]["schemaFormat"] == "application/schema+json;version=draft-07"
    schema_validator(message["payload"]["schema"]).validate(example["payload"])
    if "headers" in example:
        schema_validator(message["headers"]).validate(example["headers"])


@pytest.mark.parametrize(("name", "message", "example"), message_examples(MESSAGE_MODELS))
def test_examples_validate_with_the_models(name, message, example):
    """Every message example (but the dead letter's, refused on purpose) fits its model."""
    MESSAGE_MODELS[name].model_validate_json(json.dumps(example["payload"]))


def test_dead_letter_example_is_what_the_service_would_say():
    """The dead-letter example's x-error-message is decode_request's own message for it."""
    (example,) = document()["components"]["messages"]["DeadLetter"]["examples"]
    with pytest.raises(InvalidMessage) as info:
        decode_request("transform", json.dumps(example["payload"]).encode())
    assert info.value.message == example["headers"]["x-error-message"]


def test_every_message_has_examples_and_is_used():
    """Each component message has an example and appears on some channel."""
    doc = document()
    used = {ref for _, ref in refs_in(doc["channels"])}
    for name, message in doc["components"]["messages"].items():
        assert message["examples"], name
        assert f"#/components/messages/{name}" in used, name
    assert set(MESSAGE_MODELS) <= set(doc["components"]["messages"])


def test_topology_matches_what_the_service_declares():
    """Names and queue arguments in the document are those consumer.topology declares."""
    topology = Topology()
    declared = {spec.name for spec in topology.exchanges()} | {q.name for q in topology.queues()}
    assert declared == TOPOLOGY
    channels = document()["channels"]
    by_queue = {c["bindings"]["amqp"].get("queue", {}).get("name"): c for c in channels.values()}
    for queue in topology.queues():
        for argument, value in queue.arguments.items():
            assert f"`{argument}: {value}`" in by_queue[queue.name]["description"], argument
