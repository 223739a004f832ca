"""Property-based: arbitrary bodies, headers and properties thrown at the intake (wired to the
dispatcher and the settle point, with fakes at the edges) always end in exactly one
settlement per delivery, and whatever is published can be encoded. No broker needed."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consumer.events import APP_ID
from tests.fakes import FakeMessage, broker_down
from tests.world import intake_world

# Text as a careless client writes it: any code point, lone surrogates included.
TEXT = st.text(st.characters(codec=None, categories=None), max_size=40)
IDS = st.one_of(st.sampled_from(["t-1", "t-2", "b1-0", "order-42"]), TEXT)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), TEXT)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)
REQUEST_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "task_id": IDS,
    "batch_id": IDS,
    "user_id": st.one_of(st.sampled_from(["user_1", "mallory"]), TEXT),
    "image_url": st.one_of(st.just("https://photos.example.com/a.jpg"), TEXT),
    "image_urls": st.lists(st.just("https://photos.example.com/a.jpg"), max_size=3),
    "style_type": st.one_of(st.sampled_from(["clay", "anime", "nope"]), TEXT),
    "custom_prompt": TEXT,
    "strength": st.one_of(st.floats(allow_nan=False), st.integers()),
    "seed": st.integers(),
    "metadata": JSON_VALUES,
    "output": st.one_of(st.just({"upload_url": "https://up.example.com/x"}), JSON_VALUES),
}
REQUESTS = st.fixed_dictionaries({}, optional=REQUEST_FIELDS)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """A request-shaped document, arbitrary JSON, or arbitrary bytes."""
    kind = draw(st.sampled_from(["request", "json", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    document = draw(REQUESTS) if kind == "request" else draw(JSON_VALUES)
    return json.dumps(document).encode()  # ensure_ascii: surrogates travel as \\udXXX escapes


HEADER_VALUES = st.one_of(SCALARS, st.binary(max_size=10), st.lists(SCALARS, max_size=3))
HEADERS = st.dictionaries(
    st.one_of(st.sampled_from(["x-batch-id", "x-batch-index", "x-batch-size"]), TEXT),
    HEADER_VALUES,
    max_size=4,
)
PROPERTIES = st.fixed_dictionaries(
    {},
    optional={
        "message_id": st.one_of(st.none(), IDS),
        "reply_to": st.one_of(st.none(), st.just("amq.rabbitmq.reply-to.x"), TEXT),
        "correlation_id": st.one_of(st.none(), TEXT),
        "content_type": st.one_of(st.none(), st.just("application/json"), TEXT),
        "content_encoding": st.one_of(st.none(), st.just("utf-8"), TEXT),
        "app_id": st.one_of(st.none(), st.just(APP_ID), TEXT),
    },
)
ROUTING_KEYS = st.one_of(st.sampled_from(["transform", "transform.batch", "cancel"]), TEXT)


FAILURES = st.sampled_from([None, None, "broker", "bug"])  # what the publisher does


async def _deliver_all(deliveries: list[tuple[FakeMessage, bool]], failure: str | None) -> None:
    async with intake_world(deadline_s=0.3) as world:
        if failure is not None:
            world.publisher.fail_with = broker_down() if failure == "broker" else ValueError("bug")
        for message, control in deliveries:
            if control:
                await world.cancel(message)
            else:
                await world.deliver(message)
        for published in world.publisher.published:
            if published.kind in {"event", "reply"}:
                published.body.model_dump_json().encode()


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    st.lists(
        st.tuples(bodies(), HEADERS, PROPERTIES, ROUTING_KEYS, st.booleans()),
        min_size=1,
        max_size=4,
    ),
    FAILURES,
)
def test_every_delivery_settles_exactly_once(deliveries, failure):
    """Whatever a delivery carries, and even when publishing fails, each one is acked,
    nacked or rejected exactly once, within the settle deadline (work and control queues)."""
    messages = [
        (FakeMessage(body=body, headers=headers, routing_key=key, **props), control)
        for body, headers, props, key, control in deliveries
    ]
    asyncio.run(_deliver_all(messages, failure))
    for message, _ in messages:
        assert len(message.settlements) == 1, (message.body[:80], message.settlements)
